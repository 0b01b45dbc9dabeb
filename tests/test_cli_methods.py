"""Issue 3 through the CLI: diagnostics in the summary and on stderr, grids, layers, methods table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from camcli.cli import app
from camcli.records import load_run

runner = CliRunner()


def run(*args: object):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args])


def summary(out: Path) -> dict:
    return load_run(out)  # summary.json with the records under "images"


def test_empty_map_flagged_in_summary_and_warned(small_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    r = run("explain", small_images / "a.png", "--out", out, "--model", "toymodels:negative_head", "--workers", "0")
    assert r.exit_code == 0, r.output
    ex = summary(out)["images"][0]["explanations"][0]
    assert ex["stats"]["empty"] is True and "empty" in ex["stats"]["note"]
    assert "warning" in r.stderr and "empty" in r.stderr
    overlay = np.asarray(Image.open(out / ex["overlay"]))
    assert overlay.shape == (40, 60, 3)


def test_saturation_share_in_summary(small_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    r = run("explain", small_images / "b.jpg", "--out", out, "--model", "toymodels:tanh_net", "--layer", "conv", "--workers", "0")
    assert r.exit_code == 0, r.output
    sat = summary(out)["images"][0]["saturation"]
    assert sat["modules"] == ["squash"] and sat["share"] > 0.5
    assert "saturated" in r.stderr


def test_activation_grid_and_channels(small_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    r = run("explain", small_images / "a.png", "--out", out, "--model", "toymodels:tiny_cnn", "-M", "activations",
            "--channels", "top4", "--workers", "0", "-q")
    assert r.exit_code == 0, r.output
    ex = summary(out)["images"][0]["explanations"][0]
    assert ex["target"] is None and len(ex["channels"]["ids"]) == 4
    grid = Image.open(out / ex["channels"]["grid"])
    assert grid.size[0] > 0 and ex["channels"]["grid"] == "a.activations.grid.png"
    r = run("explain", small_images / "a.png", "--out", out, "--model", "toymodels:tiny_cnn", "-M", "activations",
            "--channels", "top99", "--workers", "0")
    assert r.exit_code == 2 and "--channels 'top99'" in r.output


def test_several_layers_with_per_layer_files(small_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    r = run("explain", small_images / "a.png", "--out", out, "--model", "toymodels:tiny_cnn", "--layer",
            "features.1,features.3", "--per-layer", "-M", "gradcam,layercam", "--workers", "0", "-q")
    assert r.exit_code == 0, r.output
    files = sorted(e["overlay"] for e in summary(out)["images"][0]["explanations"])
    assert files == sorted([
        "a.gradcam.png", "a.gradcam.features.1.png", "a.gradcam.features.3.png",
        "a.layercam.png", "a.layercam.features.1.png", "a.layercam.features.3.png",
    ])
    assert all((out / f).is_file() for f in files)


def test_signed_uses_diverging_colours(small_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    r = run("explain", small_images / "a.png", "--out", out, "--model", "toymodels:tiny_cnn", "--signed",
            "--save-raw", "--alpha", "1", "--workers", "0", "-q")
    assert r.exit_code == 0, r.output
    ex = summary(out)["images"][0]["explanations"][0]
    raw = np.load(out / ex["raw"])
    assert raw.min() < 0 < raw.max() and raw.min() >= -1 and raw.max() <= 1
    img = np.asarray(Image.open(out / ex["overlay"])).astype(int)
    neg, pos = img[raw < 0.5 * raw.min()], img[raw > 0.5 * raw.max()]
    assert len(neg) and (neg[:, 2] > neg[:, 0]).all(), "strong negative evidence is drawn blue"
    assert len(pos) and (pos[:, 0] > pos[:, 2]).all(), "strong positive evidence is drawn red"


def test_smoothing_flags_run(small_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    r = run("explain", small_images / "a.png", "--out", out, "--model", "toymodels:tiny_cnn", "--aug-smooth",
            "--eigen-smooth", "-M", "gradcam,scorecam,guided-gradcam", "--workers", "0", "-q")
    assert r.exit_code == 0, r.output
    s = summary(out)
    assert s["options"]["aug_smooth"] and s["options"]["eigen_smooth"]
    assert [e["method"] for e in s["images"][0]["explanations"]] == ["gradcam", "scorecam", "guided-gradcam"]


def test_methods_table_columns() -> None:
    r = run("methods", "--json")
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert rows["scorecam"]["extra_forwards_per_image"] == "K" and rows["scorecam"]["needs_gradients"] is False
    assert rows["gradcam++"]["aliases"] == ["gradcampp", "gradcam_pp", "gradcam-pp"]
    assert "Chattopadhay" in rows["gradcam++"]["paper"]
    table = run("methods").output
    for col in ("name", "aliases", "gradients", "extra forwards", "paper"):
        assert col in table
