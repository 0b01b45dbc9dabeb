"""The output folder: one run at a time, stale locks taken over, shards side by side."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from camcli import outdir
from camcli.cli import app
from camcli.errors import UsageError
from camcli.outdir import LOCK_NAME, OutputLock
from camcli.pipeline import ExplainOptions, run_explain as explain
from camcli.records import load_run

runner = CliRunner()
TINY = ["--model", "toymodels:tiny_cnn", "--workers", "0"]
TINY_OPTS = dict(model="toymodels:tiny_cnn", workers=0, quiet=True)
JOURNAL = "records.jsonl"


def read_summary(out: Path) -> dict:
    return load_run(out)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "in" / "img.png"
    p.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)
    return p


HOLD = (
    "import sys, time; from camcli.outdir import OutputLock\n"
    "OutputLock(sys.argv[1], 'camcli explain').acquire(); print('held', flush=True); time.sleep(60)\n"
)


def test_a_second_run_exits_2_naming_the_first_and_a_dead_runs_lock_is_taken_over(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = runner.invoke(app, ["explain", str(image), "--out", str(out), *TINY])
        assert r.exit_code == 2, r.output
        assert f"is in use by another camcli run (pid {holder.pid} on {socket.gethostname()}, started " in r.stderr
        assert time.strftime("%Y-%m-%d") in r.stderr and "Traceback" not in r.output
        assert not (out / "summary.json").exists() and not list(out.glob("*.png"))
    finally:
        holder.kill()
        holder.wait()
    # killed without releasing: its record stays, the kernel dropped its flock; the next run takes over
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    r = runner.invoke(app, ["explain", str(image), "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output
    assert f"took over '{out / LOCK_NAME}' from a run that ended without releasing it (pid {holder.pid}" in r.stderr
    assert (out / "summary.json").is_file() and not (out / LOCK_NAME).exists(), "released on the way out"


def test_the_lock_is_released_on_every_path(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = runner.invoke(app, ["explain", str(image), "--out", str(out), "--layer", "nope", *TINY])
    assert r.exit_code == 2 and not (out / LOCK_NAME).exists()
    r = runner.invoke(app, ["explain", str(image), "--out", str(out), "-q", *TINY])
    assert r.exit_code == 0 and not (out / LOCK_NAME).exists()


def test_evaluate_and_check_hold_their_out_folder(image: Path, tmp_path: Path) -> None:
    from camcli.check import run_check
    from camcli.evaluate import evaluate
    from camcli.options import EvaluateOptions

    out = tmp_path / "busy"
    with OutputLock(out, "camcli explain"):
        with pytest.raises(UsageError, match=rf"--out '{out}' is in use by another camcli run \(pid {os.getpid()} "):
            evaluate([image], EvaluateOptions(model="toymodels:tiny_cnn", out=str(out), quiet=True))
        f = tmp_path / "check.yaml"
        f.write_text(f"model: toymodels:tiny_cnn\ncases: [{{image: {image}, expect: {{top_k: 4}}}}]\n")
        with pytest.raises(UsageError, match="is in use by another camcli run"):
            run_check(f, out=out)
        assert run_check(f, out=tmp_path / "free").passed


def test_shards_share_a_folder_but_not_a_shard(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputLock(out, "camcli explain", (1, 2)), OutputLock(out, "camcli explain", (2, 2)):
        with pytest.raises(UsageError, match=rf"in use by another camcli run \(pid {os.getpid()} .*explain\)"):
            OutputLock(out, "camcli explain", (2, 2)).acquire()
        with pytest.raises(UsageError, match=r"pid \d+ .*; pid \d+ "):  # a whole-folder run names both shards
            OutputLock(out, "camcli merge").acquire()
    assert not list(out.glob(".camcli*.lock"))
    with OutputLock(out, "camcli merge"):
        pass


def test_without_flock_the_record_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(outdir.fcntl, "flock", no_flock)
    out = tmp_path / "nfs"
    out.mkdir()
    live = {"pid": os.getppid(), "host": socket.gethostname(), "started": time.time(), "command": "camcli explain"}
    (out / LOCK_NAME).write_text(json.dumps(live))
    with pytest.raises(UsageError, match=f"pid {os.getppid()} on "):
        OutputLock(out, "camcli explain").acquire()
    other_host = {**live, "host": "elsewhere", "pid": 1}
    (out / LOCK_NAME).write_text(json.dumps(other_host))
    with pytest.raises(UsageError, match="pid 1 on elsewhere"):
        OutputLock(out, "camcli explain").acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(json.dumps({**live, "pid": int(dead.stdout)}))
    lock = OutputLock(out, "camcli explain").acquire()
    assert lock.previous is not None and lock.previous["pid"] == int(dead.stdout)
    lock.release()
    assert not (out / LOCK_NAME).exists()


@pytest.fixture
def folder(make_images) -> Path:  # noqa: ANN001
    return make_images("many", 12)


def interrupt_after(n: int):  # noqa: ANN201
    """A progress callback that raises KeyboardInterrupt (Ctrl-C in the main thread) after n images."""
    seen = [0]

    def progress(k: int) -> None:
        seen[0] += k
        if seen[0] >= n:
            raise KeyboardInterrupt

    return progress


def listed_files(summary: dict) -> set[str]:
    return {e[k] for im in summary["images"] for e in im.get("explanations", []) for k in ("overlay", "raw") if e.get(k)}


def test_an_interrupted_run_leaves_a_summary_of_itself_not_of_the_run_before(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert explain([folder], ExplainOptions(out=str(out), **TINY_OPTS)).summary["counts"]["ok"] == 12
    with pytest.raises(KeyboardInterrupt):
        explain([folder], ExplainOptions(out=str(out), method="layercam", batch_size=4, **TINY_OPTS),
                progress=interrupt_after(8))
    s = read_summary(out)
    assert s["interrupted"] is True and s["options"]["method"] == ["layercam"]
    assert 0 < s["counts"]["images"] <= 8 and s["counts"]["images"] + s["counts"]["not_processed"] == 12
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("*.layercam.png")}
    assert listed_files(s) == on_disk, "the summary lists exactly the finished images' files"
    assert not (out / LOCK_NAME).exists()


def disk_full_after(monkeypatch: pytest.MonkeyPatch, n: int, *, images_only: bool) -> None:
    """Every write after the first n fails with ENOSPC (only image files with ``images_only``)."""
    from camcli import writer

    real, count, guard = writer._write_all, [0], threading.Lock()

    def write(f: object, data: bytes) -> None:
        if not images_only or data[:6] in (b"\x89PNG\r\n", b"\x93NUMPY"):
            with guard:
                count[0] += 1
                if count[0] > n:
                    raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "_write_all", write)


def output_files_on_disk(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.suffix in (".png", ".npy")}


def test_a_full_disk_stops_the_run_with_exit_4_and_the_summary_matches_the_disk(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    disk_full_after(monkeypatch, 7, images_only=True)  # overlay + raw per image: the 4th image fails half-way
    r = runner.invoke(app, ["explain", str(folder), "--out", str(out), "--save-raw", "-b", "4", "-q", *TINY])
    assert r.exit_code == 4, r.output
    assert "cannot write '" in r.stderr and "No space left on device" in r.stderr and "Traceback" not in r.output
    assert "rerun with --skip-existing" in r.stderr
    s = read_summary(out)
    assert s["interrupted"] is True and "No space left on device" in s["error"]
    assert 0 < s["counts"]["images"] < 12
    assert listed_files(s) == output_files_on_disk(out), "every listed file exists, every file is listed"
    assert not list(out.rglob("*.part")) and not (out / LOCK_NAME).exists()
    monkeypatch.undo()
    res = explain([folder], ExplainOptions(out=str(out), save_raw=True, skip_existing=True, **TINY_OPTS))
    assert res.exit_code == 0 and res.summary["counts"]["reused"] == s["counts"]["images"]


def test_when_not_even_the_summary_fits_no_stale_summary_stays(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    explain([folder], ExplainOptions(out=str(out), **TINY_OPTS))
    disk_full_after(monkeypatch, 3, images_only=False)
    r = runner.invoke(app, ["explain", str(folder), "--out", str(out), "--method", "layercam", "-q", *TINY])
    assert r.exit_code == 4 and "no summary could be written" in r.stderr, r.output
    assert not (out / "summary.json").exists(), "the older run's summary must not describe this one"


def test_an_output_folder_that_fails_at_the_journal_exits_4_without_a_traceback(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / JOURNAL).mkdir(parents=True)  # cannot be opened as a file
    r = runner.invoke(app, ["explain", str(image), "--out", str(out), *TINY])
    assert r.exit_code == 4, r.output
    assert f"cannot write '{out / JOURNAL}'" in r.stderr and "Traceback" not in r.output


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_outputs_follow_the_umask(umask: int, mode: int, image: Path, tmp_path: Path) -> None:
    from camcli.writer import reset_file_mode, write_atomic

    old = os.umask(umask)
    reset_file_mode()
    try:
        out = tmp_path / "out"
        explain([image], ExplainOptions(out=str(out), save_raw=True, **TINY_OPTS))
        write_atomic(tmp_path / "report.json", b"{}")  # reports and baselines go through the same function
        files = [out / "img.gradcam.png", out / "img.gradcam.npy", out / "summary.json", tmp_path / "report.json"]
        assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(mode) for f in files}
    finally:
        os.umask(old)
        reset_file_mode()
