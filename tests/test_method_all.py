"""`--method all`: every method that fits the model, a one-line reason for each one skipped."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from camcli.cli import app
from camcli.methods import available_methods
from camcli.options import ExplainOptions
from camcli.session import Session

runner = CliRunner()


def test_all_on_a_cam_compatible_relu_model_keeps_every_cnn_method() -> None:
    s = Session.open(ExplainOptions(model="toymodels:tiny_cnn", method="all", quiet=True))
    transformer_only = {"attention-rollout", "chefer"}  # they read attention matrices a CNN has none of
    assert [m.name for m in s.methods] == [m.name for m in available_methods() if m.name not in transformer_only]


def test_all_skips_cam_and_guided_methods_with_reasons(small_images: Path, tmp_path: Path) -> None:
    # tanh_net: no ReLU anywhere, and its head averages after a tanh (no GAP -> linear at `conv`)
    r = runner.invoke(app, ["explain", str(small_images / "a.png"), "--model", "toymodels:tanh_net", "-M", "all",
                            "--layer", "conv", "--score-channels", "2", "--samples", "1", "--rise-masks", "16",
                            "--occlusion-window", "64", "--occlusion-stride", "64", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if "--method all: skipping" in line]
    skipped = {line.split("skipping ")[1].split(":")[0] for line in lines}
    assert skipped == {"cam", "guided-backprop", "guided-gradcam", "attention-rollout", "chefer"}, r.stderr
    assert len(lines) == len(skipped) and all(len(line) < 400 for line in lines)  # one line each
    assert "ReLU" in r.stderr and "global-average-pool" in r.stderr
    written = {p.name.split(".")[1] for p in tmp_path.glob("a.*.png")}
    assert "gradcam" in written and "cam" not in written and "guided-backprop" not in written
