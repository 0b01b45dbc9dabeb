"""Signals, worker processes, the output lock and user-named report paths, through the real
command in a child process where a signal or a process is involved (issue 23, items 2, 3, 4, 11)."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from camcli.cli import app
from camcli.errors import OutputError
from camcli.outdir import LOCK_NAME, locked
from camcli.writer import write_report
from conftest import noise_images
from test_limits import camcli, child_env

runner = CliRunner()
TINY = ["--model", "toymodels:tiny_cnn", "--workers", "0", "-q"]


def _start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(camcli(*args), env=child_env(**env), cwd=cwd, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _sigterm_once_started(p: subprocess.Popen[str], marker: Path) -> str:
    """SIGTERM ``p`` once it has written ``marker`` (its work has begun); its stderr, once it ended."""
    try:
        while not marker.exists() and p.poll() is None:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    return err


def _workers(p: subprocess.Popen[str], timeout: float = 120) -> list[psutil.Process]:
    """The decoding workers of a running explain, once they have started ([] if it ended first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and p.poll() is None:
        try:
            kids = psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        if len(kids) >= 2:
            return kids
        time.sleep(0.02)
    return []


def _none_outlive(procs: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(procs, timeout=15)
    assert not alive, [(q.pid, q.status()) for q in alive]


@pytest.fixture
def many(tmp_path: Path) -> Path:
    return noise_images(tmp_path / "many", [(40, 60)] * 40)


# -- item 4: SIGTERM and SIGHUP take Ctrl-C's path ------------------------------------------------
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)], ids=["TERM", "HUP"])
def test_explain_stops_on_sigterm_and_sighup_like_ctrl_c(tmp_path: Path, many: Path, sig: int, code: int) -> None:
    out = tmp_path / "out"
    marker = tmp_path / "started"
    p = _start(["explain", str(many), "--model", "toymodels:slow_cnn", "--workers", "2", "--out", str(out)],
               tmp_path, CAMCLI_TEST_STARTED=str(marker))
    try:
        workers = _workers(p)
        while not marker.exists() and p.poll() is None:
            time.sleep(0.05)
        assert len(workers) == 2
        os.kill(p.pid, sig)  # the main process only, as `kill` does
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err
    assert f"interrupted by {signal.Signals(sig).name}" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["counts"]["images"] < 40
    assert not (out / LOCK_NAME).exists()
    _none_outlive(workers)


def test_evaluate_stops_on_sigterm_with_the_message(tmp_path: Path, many: Path) -> None:
    marker = tmp_path / "started"
    p = _start(["evaluate", str(many), "--model", "toymodels:slow_cnn", "--out", str(tmp_path / "ev"), "--steps", "2"],
               tmp_path, CAMCLI_TEST_STARTED=str(marker))
    err = _sigterm_once_started(p, marker)
    assert p.returncode == 143 and "interrupted by SIGTERM" in err and "Traceback" not in err, err
    assert not (tmp_path / "ev" / LOCK_NAME).exists()


# -- item 2: workers die with the run and never hold its lock -------------------------------------
def test_sigkill_leaves_no_worker_and_no_lock(tmp_path: Path, many: Path) -> None:
    out = tmp_path / "out"
    args = ["explain", str(many), "--model", "toymodels:slow_cnn", "--workers", "2", "--out", str(out), "-q"]
    p = _start(args, tmp_path)
    try:
        workers = _workers(p)
        assert len(workers) == 2
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    _none_outlive(workers)  # not orphaned, blocked on a pipe, holding memory and the lock
    r = subprocess.run(camcli("explain", str(many), *TINY[:-1], "--out", str(out), "--skip-existing"),
                       env=child_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"took over '{out / LOCK_NAME}' from a run that ended without releasing it (pid {p.pid}" in r.stderr


HOLD_AND_FORK = """
import os, sys, time
from camcli.outdir import locked
lock = locked(sys.argv[1], "camcli explain")
if os.fork() == 0:  # a child that outlives its parent, as a DataLoader worker could
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    time.sleep(60)
    os._exit(0)
print(os.getpid(), flush=True)
os._exit(0)  # the parent dies holding the folder
"""


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", HOLD_AND_FORK, str(out)], env=child_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    child = [q for q in psutil.process_iter(["ppid", "cmdline"])
             if q.info["cmdline"] and HOLD_AND_FORK in q.info["cmdline"]]
    assert child, "the forked child should still be running"
    try:
        warned: list[str] = []
        with locked(out, "camcli explain", warn=warned.append):  # not "in use by another camcli run"
            pass
        assert len(warned) == 1 and f"pid {r.stdout.strip()}" in warned[0]
    finally:
        for q in child:
            q.kill()


def test_takeover_removes_the_part_files_a_killed_run_left(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / LOCK_NAME).write_text(json.dumps({"pid": 999999999, "host": "elsewhere", "started": 0}))
    (out / "sub" / ".a.gradcam.png.x1y2.part").write_bytes(b"half")
    (out / ".records.jsonl.part").write_bytes(b"half")
    (out / "keep.part").write_bytes(b"a user's file")
    warned: list[str] = []
    with locked(out, "camcli explain", warn=warned.append):
        pass
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["keep.part"]
    assert "removed 2 unfinished .part files" in warned[0]


# Starts `camcli` as the command would be started, without paying Python's and torch's import for
# each of the soak test's 21 runs: this process imports them once, then forks one child per run
# that runs camcli's main() with the run's arguments (its stderr into a file).
ZYGOTE = """
import json, os, sys
import torch, camcli.cli, camcli.pipeline, toymodels
for line in sys.stdin:
    req = json.loads(line)
    if "wait" in req:
        _, status = os.waitpid(req["wait"], 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_RDWR)
        err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(null, 0); os.dup2(null, 1); os.dup2(err, 2)
        sys.argv = ["camcli", *req["argv"]]
        code = 1
        try:
            camcli.cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
"""


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Zygote:
    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=child_env(), cwd=cwd, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _ask(self, req: dict[str, object]) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, argv: list[str], stderr: Path) -> int:
        return self._ask({"argv": argv, "stderr": str(stderr)})

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_sigkill_at_random_points_then_resume(tmp_path: Path) -> None:
    """SIGKILL, 20 times at seeded random points of a run with two decoding workers, each run
    resuming the last; then a run to the end. Every image has one record and one set of files, no
    process outlives its run and no lock stays."""
    images = noise_images(tmp_path / "in", [(24 + 8 * (i % 3), 32) for i in range(30)])
    out = tmp_path / "out"
    err = tmp_path / "stderr.txt"
    args = ["explain", str(images), "--model", "toymodels:tiny_cnn", "--workers", "2", "--batch-size", "2",
            "--save-raw", "--out", str(out), "--skip-existing", "-q"]
    rng = random.Random(23)
    zygote = Zygote(tmp_path)
    try:
        for k in range(20):
            done = _lines(out / "records.jsonl")
            pid = zygote.start(args, err)
            workers: list[psutil.Process] = []
            while len(workers) < 2 and _running(pid):
                workers = psutil.Process(pid).children(recursive=True)
                time.sleep(0.01)
            if k % 2:  # a random point once the workers run: loading, decoding, the first batches
                time.sleep(rng.uniform(0.0, 0.3))
            else:  # a random point among the writes: after 1 to 3 more images are recorded
                more = done + rng.randint(1, 3)
                while _lines(out / "records.jsonl") < more and _running(pid):
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.05))
            os.kill(pid, signal.SIGKILL)
            code = zygote.wait(pid)
            assert code in (-signal.SIGKILL, 0), err.read_text()  # never "in use by another camcli run"
            _none_outlive(workers)
        pid = zygote.start(args, err)
        assert zygote.wait(pid) == 0, err.read_text()
    finally:
        zygote.close()
    assert not (out / LOCK_NAME).exists()
    lines = (out / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[1:]]  # the first line is the run's header
    assert sorted(rec["rel"] for rec in records) == sorted(f"{i:02d}.png" for i in range(30))
    assert all(rec["status"] == "ok" for rec in records)
    listed = {f for rec in records for e in rec["explanations"] for f in (e["overlay"], e["raw"])}
    assert len(listed) == 60
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk - listed == {"records.jsonl", "summary.json", ".camcli-plan.txt"}, on_disk - listed
    assert listed <= on_disk


# -- item 3: user-named report paths are written through ------------------------------------------
def test_report_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    target = tmp_path / "reports" / "r.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_report(link, b"new")
    assert link.is_symlink() and os.readlink(link) == str(target) and target.read_bytes() == b"new"
    dangling = tmp_path / "dangling.xml"
    dangling.symlink_to(tmp_path / "reports" / "later.xml")
    write_report(dangling, b"x")
    assert dangling.is_symlink() and (tmp_path / "reports" / "later.xml").read_bytes() == b"x"


def test_report_into_a_fifo_and_a_device_is_written_through(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_report(fifo, b"<xml/>")
    reader.join(timeout=30)
    assert got == [b"<xml/>"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    write_report("/dev/null", b"x")
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    if os.path.exists("/dev/full"):
        with pytest.raises(OutputError, match="/dev/full"):
            write_report("/dev/full", b"x" * 10)
        assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)  # still the device, even as root


def test_check_writes_its_reports_through_a_link_and_a_fifo(tmp_path: Path, samples: Path) -> None:
    import shutil

    import yaml

    shutil.copy(samples / "chelsea.jpg", tmp_path / "chelsea.jpg")
    doc = {"method": "gradcam", "cases": [{"image": "chelsea.jpg", "class": 285, "expect": {"top_k": 5}}]}
    (tmp_path / "check.yaml").write_text(yaml.safe_dump(doc))
    real = tmp_path / "real.json"
    link = tmp_path / "link.json"
    link.symlink_to(real)
    fifo = tmp_path / "junit.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    r = runner.invoke(app, ["check", str(tmp_path / "check.yaml"), "--json", str(link), "--junit", str(fifo)])
    reader.join(timeout=30)
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and json.loads(real.read_text())["passed"] is True
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and got and got[0].startswith(b"<?xml")


# -- item 11: inputs never include the run's own outputs ------------------------------------------
def _explained(out: Path) -> list[str]:
    lines = (out / "records.jsonl").read_text().splitlines()[1:]
    return sorted(json.loads(line)["rel"] for line in lines)


def test_a_glob_does_not_read_the_outputs_in_it(tmp_path: Path) -> None:
    images = noise_images(tmp_path / "in", [(32, 32)] * 3)
    for _ in range(2):
        r = runner.invoke(app, ["explain", str(images / "**" / "*.png"), "-r", *TINY, "-o", str(images / "heat")])
        assert r.exit_code == 0, r.output
        assert _explained(images / "heat") == ["00.png", "01.png", "02.png"]
    assert sorted(p.name for p in (images / "heat").rglob("*.png")) == [
        "00.gradcam.png", "01.gradcam.png", "02.gradcam.png"]
    # the shell's own expansion of the glob names the outputs one by one: still not inputs
    named = [str(p) for p in sorted(images.rglob("*.png"))]
    r = runner.invoke(app, ["explain", *named, *TINY, "-o", str(images / "heat")])
    assert r.exit_code == 0, r.output
    assert _explained(images / "heat") == ["00.png", "01.png", "02.png"]


def test_the_input_folder_as_output_folder_explains_its_images_only(tmp_path: Path) -> None:
    images = noise_images(tmp_path / "in", [(32, 32)] * 3)
    for _ in range(2):
        r = runner.invoke(app, ["explain", str(images), *TINY, "-o", str(images)])
        assert r.exit_code == 0, r.output
        assert _explained(images) == ["00.png", "01.png", "02.png"]
    assert sorted(p.name for p in images.glob("*.png")) == [
        "00.gradcam.png", "00.png", "01.gradcam.png", "01.png", "02.gradcam.png", "02.png"]


def test_a_signal_ignored_at_start_stays_ignored() -> None:
    """Under nohup (SIGHUP ignored) a hangup must not stop the run; the others are taken and given back."""
    from camcli.signals import Interrupted, stop_on_signals

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)  # nothing happens
            with pytest.raises(Interrupted) as e:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler runs at the next bytecode; never reached
        assert e.value.exit_code == 143 and e.value.name == "SIGTERM"
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # after a signal: one more must not kill
    finally:
        for s, handler in saved.items():  # later tests' children inherit what this process ignores
            signal.signal(s, handler)


def test_check_stopped_by_sigterm_still_writes_its_reports(tmp_path: Path, many: Path) -> None:
    import yaml

    cases = [{"image": str(p), "class": 0, "expect": {"top_k": 3}} for p in sorted(many.glob("*.png"))[:20]]
    (tmp_path / "check.yaml").write_text(yaml.safe_dump({"model": "toymodels:slow_cnn", "cases": cases}))
    marker = tmp_path / "started"
    p = _start(["check", "check.yaml", "--junit", "r.xml", "--json", "r.json"], tmp_path, CAMCLI_TEST_STARTED=str(marker))
    err = _sigterm_once_started(p, marker)
    assert p.returncode == 143 and "interrupted by SIGTERM" in err and "Traceback" not in err, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False and report["interrupted"] == "SIGTERM"
    assert report["not_run"] == 20 - len({r["case_index"] for r in report["rules"]}) > 0
    junit = (tmp_path / "r.xml").read_text()
    assert 'errors="1"' in junit and f"stopped by SIGTERM; {report['not_run']} cases not run" in junit
