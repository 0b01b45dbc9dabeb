"""torchvision segmentation models: their default layer lets --region matter (issue 24.3), and
fine-tuned or complete state dicts load with the class count and auxiliary head they hold (24.4).

Every model is built here with random weights (weights=None, weights_backbone=None): nothing is
downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as tvm

from camcli.models import load_model
from camcli.options import ExplainOptions
from camcli.session import Session
from camcli.targets import ClassIndex


def _save(tmp_path: Path, name: str, **kw: object) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = tvm.get_model(name, weights=None, weights_backbone=None, **kw)
    path = tmp_path / f"{name}.pth"
    sd = model.state_dict()
    torch.save(sd, path)
    return str(path), sd


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize(
    ("name", "stage", "head"),
    [("fcn_resnet50", "backbone.layer4", "classifier.3"), ("lraspp_mobilenet_v3_large", "backbone.16", None)],
)
def test_two_regions_give_different_maps_at_the_default_layer(
    tmp_path: Path, name: str, stage: str, head: str | None
) -> None:
    weights, _ = _save(tmp_path, name, num_classes=3)
    lm = load_model(name, weights, image_size=64)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    def maps(layer: str | None) -> list[np.ndarray]:
        out = []
        for region in ("0,0,0.25,0.25", "0.75,0.75,1,1"):  # opposite corners
            opts = ExplainOptions(model=name, weights=weights, region=region, layer=layer, image_size=64, quiet=True)
            s = Session.open(opts, model=lm)
            assert s.layers == [layer or stage]
            out.append(s.engine.maps(x, [ClassIndex(1)], sizes=[(64, 64)])[0].maps[0].cam)
        assert out[0].std() > 0 and out[1].std() > 0
        return out

    # At the backbone's last stage (the default) the region decides Grad-CAM's weights.
    assert _pearson(*maps(None)) < 0.9
    if head is not None:  # the old default: a 1x1 convolution and an upsampling away from the scores
        assert _pearson(*maps(head)) > 0.999  # the class's conv weights, whatever the region


@pytest.mark.parametrize(
    ("name", "kw", "aux"),
    [
        ("fcn_resnet50", {"num_classes": 5, "aux_loss": True}, True),  # torchvision's own files hold aux_classifier
        ("deeplabv3_mobilenet_v3_large", {"num_classes": 4}, False),
        ("deeplabv3_mobilenet_v3_large", {"num_classes": 7, "aux_loss": True}, True),
        ("lraspp_mobilenet_v3_large", {"num_classes": 2}, False),  # lraspp has no auxiliary head
    ],
)
def test_fine_tuned_segmentation_state_dicts_load(tmp_path: Path, name: str, kw: dict, aux: bool) -> None:
    weights, sd = _save(tmp_path, name, **kw)
    lm = load_model(name, weights, image_size=64)
    assert lm.task == "segmentation" and lm.num_classes == kw["num_classes"]
    assert (getattr(lm.module, "aux_classifier", None) is not None) == aux
    got = lm.module.state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)  # every tensor, as saved
    assert lm.labels is None  # the 21 VOC names of torchvision's weights do not fit 5 classes
