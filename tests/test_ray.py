"""`camcli explain --ray`: the same files, maps and summary as a local run, on a local Ray instance."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from camcli.cli import app
from camcli.pipeline import ExplainOptions, run_explain as explain
from camcli.records import load_run

runner = CliRunner()
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def folder(make_images) -> Path:  # noqa: ANN001
    return make_images("in", 6, seed=5, sub=2, broken=True)


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}


def assert_close(a: Any, b: Any, where: str = "") -> None:  # noqa: ANN401
    """Records equal up to float rounding: maps equal to 1e-6 can round a 6-decimal score either way."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=2e-6), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_ray_run_equals_the_local_run(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    local = explain([folder], ExplainOptions(model="toymodels:tiny_cnn", out=str(tmp_path / "local"), recursive=True,
                                             save_raw=True, method="gradcam,layercam", workers=0, quiet=True))
    # Ray's workers inherit the environment: they import camcli and the toy models like this process
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        r = runner.invoke(app, ["explain", str(folder), "-r", "--save-raw", "-M", "gradcam,layercam", "--model",
                                "toymodels:tiny_cnn", "--out", str(tmp_path / "ray"), "-q", "--ray"])
    finally:
        ray.shutdown()
    assert r.exit_code == local.exit_code == 3, r.output  # broken.png fails on its own, the rest go on
    a, b = tmp_path / "local", tmp_path / "ray"
    assert files(a) == files(b) and len([f for f in files(a) if f.endswith(".npy")]) == 12
    for f in files(a):
        if f.endswith(".npy"):
            np.testing.assert_allclose(np.load(b / f), np.load(a / f), atol=1e-6, err_msg=f)
    ra, rb = load_run(a), load_run(b)
    assert_close(rb["images"], ra["images"], "images")
    assert rb["counts"] == ra["counts"]
    assert_close(rb["aggregate"], ra["aggregate"], "aggregate")
    assert rb["fingerprint"] == ra["fingerprint"] and rb["device"] == "ray: 1 CPU actor(s)"
    assert rb["options"]["ray"] == "default" and not (b / ".camcli.lock").exists()


def test_ray_without_the_extra_says_how_to_install_it(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    r = runner.invoke(app, ["explain", str(folder), "--model", "toymodels:tiny_cnn", "--out", str(tmp_path / "o"), "--ray"])
    assert r.exit_code == 2, r.output
    assert "pip install 'camcli[ray]'" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "o" / "records.jsonl").exists()


def test_ray_address_is_optional_and_checked() -> None:
    from camcli import options as O

    assert O.fill_flag_values("explain", ["photos/", "--ray"]) == ["photos/", "--ray=default"]
    assert O.fill_flag_values("explain", ["--ray", "photos/"]) == ["--ray=default", "photos/"]
    assert O.fill_flag_values("explain", ["photos/", "--ray", "ray://head:10001"]) == ["photos/", "--ray", "ray://head:10001"]
    r = runner.invoke(app, ["explain", "x.png", "--ray=photos/"])
    assert r.exit_code == 2 and "--ray 'photos/' is not a Ray address" in r.output


def test_an_actor_tunes_the_allocator_of_its_own_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray actor owns its worker process, as the command owns its own: it keeps freed heap memory
    for the next batch (camcli.allocator; tests/test_allocator.py counts the page faults it saves)."""
    import camcli.allocator
    import camcli.ray_runner as R

    calls: list[int] = []
    monkeypatch.setattr(camcli.allocator, "keep_heap_memory", lambda: calls.append(1) or True)
    monkeypatch.chdir(tmp_path)  # the actor changes into the driver's folder: undone after the test
    monkeypatch.setattr(sys, "path", list(sys.path))
    actor = R.CamActor({"model": "toymodels:tiny_cnn", "quiet": True}, str(tmp_path / "o"), str(TESTS))
    assert calls == [1] and actor.session.layers
