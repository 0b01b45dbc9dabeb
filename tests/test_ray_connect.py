"""`--ray` fails in bounded time on an address nothing answers at, says what is wrong with an address
that is not one, and leaves no file without a record when the run is interrupted (issue 23.10)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from camcli.cli import app
from camcli.pipeline import ExplainOptions, run_explain as explain
from camcli.ray_runner import RAY_DATA_FETCH_THREAD, adopt_journals, stop_iteration
from camcli.records import RecordStream, iter_records, output_files

runner = CliRunner()
TESTS = Path(__file__).resolve().parent


def test_refused_ray_address_fails_within_ray_timeout(make_images, tmp_path: Path) -> None:  # noqa: ANN001
    folder = make_images("in", 2)
    start = time.monotonic()
    r = runner.invoke(app, ["explain", str(folder), "--model", "toymodels:tiny_cnn", "-o", str(tmp_path / "o"),
                            "--ray", "127.0.0.1:1", "--ray-timeout", "1.5"])
    took = time.monotonic() - start
    assert r.exit_code == 2, r.output
    text = " ".join(r.stderr.split())
    assert "no Ray cluster answered at 127.0.0.1:1 within 1.5 s" in text and "--ray-timeout" in text
    assert "Traceback" not in r.output and took < 60  # ray.init alone retries for ever
    assert not (tmp_path / "o" / "summary.json").exists()


def test_ray_address_with_a_bad_port_is_an_address_error_not_an_input(make_images, tmp_path: Path) -> None:  # noqa: ANN001
    folder = make_images("in", 2)
    r = runner.invoke(app, ["explain", "--ray", "nosuch:xx", str(folder), "--model", "toymodels:tiny_cnn",
                            "-o", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    text = " ".join(r.stderr.split())
    assert "--ray" in text and "'nosuch:xx' is not a Ray address" in text and "port 'xx' is not a number" in text
    assert "no such" not in text.lower()  # not read as an input path


def _record(key: str, files: list[str]) -> dict:
    return {"path": key, "rel": key, "key": key, "status": "ok", "error": None,
            "explanations": [{"method": "gradcam", "layer": "features", "overlay": f, "raw": None} for f in files]}


def test_adopt_journals_records_finished_images_and_removes_half_written_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    journal = out / ".camcli-ray.1"
    journal.mkdir(parents=True)
    for name in ("a.gradcam.png", "b.gradcam.png", "c.gradcam.png", "d.gradcam.png"):
        (out / name).write_bytes(b"png")
    lines = [
        _record("a.png", ["a.gradcam.png"]),  # the driver has it already
        _record("b.png", ["b.gradcam.png"]),  # finished in an actor, never received: adopted
        _record("c.png", ["c.gradcam.png", "c.layercam.png"]),  # one file missing: removed
    ]
    (journal / "11-a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"key": "d.pn')  # cut short
    stream = RecordStream(out / "records.jsonl", {"fingerprint": "x"})
    stream.open()
    have = {"a.png"}
    assert adopt_journals(journal, stream, out, have) == 1
    stream.close()
    assert [r["key"] for r in iter_records(out / "records.jsonl")] == ["b.png"] and have == {"a.png", "b.png"}
    assert sorted(p.name for p in out.glob("*.png")) == ["a.gradcam.png", "b.gradcam.png", "d.gradcam.png"]


def test_interrupted_ray_run_leaves_no_file_without_a_record(
    make_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    folder = make_images("in", 6, seed=3)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "out"

    def ctrl_c(n: int) -> None:
        time.sleep(4)  # the actor goes on writing the next images meanwhile
        raise KeyboardInterrupt

    opts = ExplainOptions(model="toymodels:tiny_cnn", out=str(out), ray="default", batch_size=1, workers=0, quiet=True)
    with pytest.raises(KeyboardInterrupt):
        explain([folder], opts, progress=ctrl_c)
    records = list(iter_records(out / "records.jsonl"))
    listed = {f for r in records for f in output_files(r)}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert on_disk == listed and len(records) == len({r["key"] for r in records}) >= 1
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True
    assert not list(out.glob(".camcli-ray*"))


def test_stopping_the_row_iterator_waits_for_its_fetching_threads() -> None:
    """An interrupted --ray run ended the whole process (exit 1, no summary): ray.shutdown() ran while
    a Ray Data fetching thread was still finishing its block, and that thread then touched the
    shut-down core worker. stop_iteration closes the iterator and waits for those threads first."""
    release = threading.Event()
    finished: list[str] = []

    def fetch() -> None:  # a fetching thread still busy with its block when the iterator is closed
        release.wait(5)
        time.sleep(0.3)
        finished.append("fetched")

    class Rows:
        closed = False

        def close(self) -> None:
            self.closed = True
            release.set()

    fetcher = threading.Thread(target=fetch, name=RAY_DATA_FETCH_THREAD, daemon=True)
    other = threading.Thread(target=release.wait, name="unrelated", daemon=True)
    fetcher.start()
    other.start()
    rows = Rows()
    stop_iteration(rows, timeout=10)  # type: ignore[arg-type]
    assert rows.closed and finished == ["fetched"] and not fetcher.is_alive()
