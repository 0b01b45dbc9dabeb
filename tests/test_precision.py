"""--precision: the forward under autocast, maps in fp32, refusals, and what the summary records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from camcli.cli import app
from camcli.engine import CamEngine, EngineConfig
from camcli.errors import UsageError
from camcli.images import Preprocess, decode
from camcli.methods import MethodInfo, get_method
from camcli.sanity import pearson
from camcli.session import resolve_precision
from camcli.targets import ClassIndex

TINY = "toymodels:tiny_cnn"


def test_bf16_maps_agree_with_fp32_on_the_sample_photos(samples: Path, bundled) -> None:  # noqa: ANN001
    methods = [get_method(m) for m in ("gradcam", "gradcam++", "layercam", "eigencam")]
    pre = Preprocess(224, bundled.mean, bundled.std, True)
    engines = {p: CamEngine(bundled.module, EngineConfig(["bn2"], methods, precision=p)) for p in ("fp32", "bf16")}
    for photo in sorted(samples.glob("*.jpg")):
        x = pre(decode(photo))[None]
        with torch.inference_mode():
            cls = int(bundled.module(x).argmax())  # the same class for both: astronaut's top two are close
        fp32, bf16 = (engines[p].maps(x, [ClassIndex(cls)])[0] for p in ("fp32", "bf16"))
        assert [m.method for m in fp32.maps] == [m.method for m in bf16.maps]
        for a, b in zip(fp32.maps, bf16.maps):
            assert not a.empty and not b.empty
            r = pearson(a.cam, b.cam)
            assert r > 0.99, f"{photo.name} {a.method}: Pearson {r:.4f} between bf16 and fp32"
            assert b.score is None or abs(b.score - a.score) < 0.05 * abs(a.score) + 0.05


def test_forward_runs_in_bf16_and_methods_get_fp32(bundled) -> None:  # noqa: ANN001
    seen: dict[str, torch.dtype] = {}
    layer = bundled.module.get_submodule("bn2")

    def record(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        seen.setdefault("layer output", out.dtype)

    handle = layer.register_forward_hook(record)

    def spy(inputs):  # noqa: ANN001, ANN202
        seen["activations"], seen["gradients"] = inputs.activations.dtype, inputs.gradients.dtype
        return inputs.activations

    try:
        CamEngine(bundled.module, EngineConfig(["bn2"], [MethodInfo("spy", spy, "", "", needs_gradients=True)],
                  precision="bf16")).maps(torch.randn(1, 3, 64, 64), [ClassIndex(1)])
    finally:
        handle.remove()
    assert seen == {"layer output": torch.bfloat16, "activations": torch.float32, "gradients": torch.float32}


def test_precision_resolves_per_device_and_fp16_is_refused_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(UsageError, match="fp16 runs on CUDA only"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UsageError, match="resolve 'auto' first"):
        CamEngine(torch.nn.Conv2d(3, 3, 1), EngineConfig(["weight"], [get_method("gradcam")], precision="auto"))


def test_summary_records_the_precision_that_ran(tmp_path: Path, small_images: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["explain", str(small_images / "a.png"), "--model", TINY, "--precision", "auto",
                            "--out", str(tmp_path / "auto"), "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["options"]["precision"] == "fp32"
    r = runner.invoke(app, ["explain", str(small_images / "a.png"), "--model", TINY, "--precision", "fp16",
                            "--out", str(tmp_path / "half")])
    assert r.exit_code == 2 and "--precision fp16 runs on CUDA only" in r.output
    r = runner.invoke(app, ["explain", str(small_images / "a.png"), "--precision", "fp8"])
    assert r.exit_code == 2 and "is not one of fp32, bf16, fp16, auto" in r.output
