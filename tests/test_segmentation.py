"""Segmentation models: class c's score summed over a region, checked on paper and against pytorch-grad-cam."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from camcli.cli import app
from camcli.engine import finalize
from camcli.errors import UsageError
from camcli.options import ExplainOptions
from camcli.session import Session
from camcli.targets import ClassIndex, Region, parse_region
from toymodels import tiny_seg

runner = CliRunner()


def _session(**kw: object) -> Session:
    return Session.open(ExplainOptions(model="toymodels:tiny_seg", layer="features", quiet=True, **kw))


def _by_hand(x: torch.Tensor, c: int, region: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """target = sum over R of S_c, S_c = sum_k W_ck A_k + b_c, so dtarget/dA_k = W_ck * R:
    Grad-CAM weighs A_k by W_ck |R| / hw (a positive factor of W_ck) and HiResCAM is R * sum_k W_ck A_k."""
    m = tiny_seg().eval()
    with torch.no_grad():
        a = m.features(x)
        scores = m(x)["out"]
    w = m.head.weight[:, :, 0, 0].detach()
    r = (scores.argmax(dim=1) == c).float() if region is None else region[None]
    weighted = (w[c][None, :, None, None] * a).sum(dim=1)
    return finalize(weighted)[0][0].numpy(), finalize(weighted * r)[0][0].numpy()


def test_predicted_region_by_hand() -> None:
    x = torch.randn(1, 3, 24, 32)
    s = _session(method="gradcam,hirescam", classes="1")
    out = s.engine.maps(x, [ClassIndex(1)])[0]
    grad, hires = _by_hand(x, 1, None)
    maps = {m.method: m for m in out.maps}
    np.testing.assert_allclose(maps["gradcam"].cam, grad, atol=1e-5)
    np.testing.assert_allclose(maps["hirescam"].cam, hires, atol=1e-5)
    assert maps["gradcam"].region["kind"] == "predicted"
    shares = dict(out.top)
    assert abs(sum(shares.values()) - 1.0) < 1e-6  # every pixel belongs to one of the 3 classes


def test_box_region_by_hand() -> None:
    x = torch.randn(1, 3, 24, 32)
    s = _session(method="hirescam", region="0,0,0.5,0.5")
    out = s.engine.maps(x, [ClassIndex(2)], sizes=[(24, 32)])[0]
    box = torch.zeros(12, 16)
    box[:6, :8] = 1  # the top-left quarter of the 12x16 output grid
    _, hires = _by_hand(x, 2, box)
    np.testing.assert_allclose(out.maps[0].cam, hires, atol=1e-5)
    assert out.maps[0].region == {"kind": "box", "share": 0.25}
    assert (out.maps[0].cam[6:, :] == 0).all() and (out.maps[0].cam[:, 8:] == 0).all()


def test_region_in_pixels_and_from_a_mask(tmp_path: Path) -> None:
    grid = Region(box=(0.0, 0.0, 50.0, 40.0)).on_grid((80, 100), (8, 10))
    assert grid.sum() == 20 and grid[:4, :5].all()  # pixels: half of each side
    from PIL import Image

    mask = np.zeros((80, 100), np.uint8)
    mask[40:, 50:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert parse_region(None, str(tmp_path / "m.png")).on_grid((80, 100), (8, 10))[4:, 5:].all()
    for bad in ((1, 2, 3), (5, 5, 1, 1), (0, -1, 2, 2)):
        with pytest.raises(UsageError, match="--region"):
            parse_region(bad, None)


def test_classifier_refuses_a_region() -> None:
    with pytest.raises(UsageError, match="segmentation models"):
        Session.open(ExplainOptions(model="toymodels:tiny_cnn", region="0,0,10,10", quiet=True))


def test_agrees_with_pytorch_grad_cam_semantic_segmentation_target(samples: Path) -> None:
    """pytorch-grad-cam's SemanticSegmentationTarget sums class c's output over a mask, as camcli does
    with the predicted pixels: same torchvision model (random weights), same layer, same input."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from camcli.images import decode

    torch.manual_seed(0)
    s = Session.open(ExplainOptions(model="lraspp_mobilenet_v3_large", weights="random", image_size=128, quiet=True))
    rgb = decode(samples / "chelsea.jpg")
    batch = s.preprocess.resize(rgb)[None]
    out = s.explain_images(batch)[0]
    c = out.maps[0].target
    x = s.preprocess.normalize(batch.float())
    model = s.model.module.float().eval()

    class OutOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.model(t)["out"]

    wrapped = OutOnly()
    with torch.no_grad():
        mask = (wrapped(x).argmax(dim=1)[0] == c).float().numpy()
    layer = model.get_submodule(s.layers[0])
    with GradCAM(model=wrapped, target_layers=[layer]) as cam:
        theirs = cam(input_tensor=x, targets=[SemanticSegmentationTarget(c, mask)])[0]
    ours = torch.nn.functional.interpolate(torch.from_numpy(out.maps[0].cam)[None, None], size=theirs.shape,
                                           mode="bilinear", align_corners=False)[0, 0].numpy()
    r = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    assert r > 0.98, r


def test_cli_summary_records_pixel_shares_and_regions(small_images: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["explain", str(small_images / "a.png"), "--model", "toymodels:tiny_seg", "-c", "top2",
                            "--out", str(tmp_path), "-q"])
    assert r.exit_code == 0, r.output
    from camcli.records import load_run

    s = load_run(tmp_path)  # summary.json with records.jsonl's records under "images"
    im = s["images"][0]
    assert s["model"]["task"] == "segmentation"
    assert all("pixel_share" in p and "probability" not in p for p in im["predictions"])
    assert [e["target"]["index"] for e in im["explanations"]] == [p["index"] for p in im["predictions"][:2]]
    assert all(e["target"]["region"]["kind"] == "predicted" for e in im["explanations"])
    shares = {p["index"]: p["pixel_share"] for p in im["predictions"]}
    assert all(e["target"]["region"]["share"] == pytest.approx(shares[e["target"]["index"]]) for e in im["explanations"])


def test_check_rules_work_for_segmentation(small_images: Path, tmp_path: Path) -> None:
    import yaml

    from camcli.check import run_check

    from camcli.images import decode

    sess = _session(method="hirescam", region="0,0,0.5,0.5")
    rgb = decode(small_images / "b.jpg")
    outs = [sess.explain_images(sess.preprocess.resize(rgb)[None], [ClassIndex(c)], [rgb.shape[:2]])[0] for c in range(3)]
    c = next(c for c, o in enumerate(outs) if not o.maps[0].empty)  # a class with positive evidence there
    f = tmp_path / "seg.yaml"
    f.write_text(yaml.safe_dump({"model": "toymodels:tiny_seg", "layer": "features", "method": "hirescam",
                                 "region": "0,0,0.5,0.5",
                                 "cases": [{"image": str(small_images / "b.jpg"), "class": c,
                                            "expect": {"region": [0, 0, 25, 25], "min_energy_in_region": 0.99}}]}))
    rep = run_check(f)
    assert rep.passed, [r.message for r in rep.rules]  # HiResCAM is zero outside the explained box
