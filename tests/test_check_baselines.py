"""`camcli check` validates every baseline before any model work (issue 23.9): a truncated,
non-finite or malformed `.npy` is a usage error (exit 2) that names the file and what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import camcli.check
from camcli.cli import app
from camcli.fullmap import baseline_problem

runner = CliRunner()


@pytest.fixture
def checkdir(tmp_path: Path, samples: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "images").mkdir()
    shutil.copy(samples / "chelsea.jpg", tmp_path / "images" / "chelsea.jpg")  # 451x300
    (tmp_path / "base").mkdir()
    doc = {"method": "gradcam", "baselines": "base",
           "cases": [{"image": "images/chelsea.jpg", "class": 285, "expect": {"min_baseline_similarity": 0.9}}]}
    (tmp_path / "check.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))

    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("the model was opened before the baselines were validated")

    monkeypatch.setattr(camcli.check.Session, "open", no_model)
    return tmp_path


def _write(path: Path, arr: np.ndarray, cut: int = 0) -> None:
    np.save(path, arr)
    if cut:
        data = path.read_bytes()
        path.write_bytes(data[:-cut])


GOOD = np.linspace(0, 1, 300 * 451, dtype=np.float32).reshape(300, 451)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: _write(p, GOOD, cut=1000), "is truncated"),
        (lambda p: _write(p, np.where(GOOD > 0.5, np.nan, GOOD).astype(np.float32)), "non-finite values"),
        (lambda p: _write(p, np.full((300, 451), np.inf, np.float32)), "non-finite values"),
        (lambda p: _write(p, GOOD[None]), "not a 2-D map"),
        (lambda p: p.write_bytes(b"PNG not a numpy file"), "not a readable .npy file"),
        (lambda p: p.write_bytes(b""), "not a readable .npy file"),
    ],
)
def test_bad_baselines_are_usage_errors_before_the_model(checkdir: Path, make, words: str) -> None:  # noqa: ANN001
    b = checkdir / "base" / "000-chelsea.gradcam.npy"
    make(b)
    r = runner.invoke(app, ["check", str(checkdir / "check.yaml")])
    text = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert words in text and str(b) in text and "--update-baselines" in text
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_a_good_baseline_passes_validation(tmp_path: Path) -> None:
    b = tmp_path / "b.npy"
    _write(b, GOOD)
    assert baseline_problem(b) is None
    _write(b, GOOD.astype(np.float64))  # any float width and a version 1.0 header alike
    assert baseline_problem(b) is None
    _write(b, GOOD, cut=1)  # one byte short is truncated too
    assert "truncated" in baseline_problem(b)
