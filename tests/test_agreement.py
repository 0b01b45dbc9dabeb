"""Agreement with pytorch-grad-cam on a real model and photo, and the Adebayo sanity check."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from camcli.engine import CamEngine, EngineConfig
from camcli.images import Preprocess, decode
from camcli.methods import MethodOptions, get_method
from camcli.sanity import pearson, randomized_copy, spearman
from camcli.targets import ClassIndex

CAT = 285
# name in camcli -> pytorch-grad-cam class. Deliberate difference: EigenCAM/EigenGradCAM's sign is
# arbitrary in pytorch-grad-cam (raw SVD); camcli fixes it so the map correlates positively with the
# activations, so for those two the test compares |r|.
GRADIENT_PAIRS = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "hirescam": pgc.HiResCAM,
    "gradcam-elementwise": pgc.GradCAMElementWise,
    "layercam": pgc.LayerCAM,
    "eigencam": pgc.EigenCAM,
    "eigengradcam": pgc.EigenGradCAM,
}
PERTURBATION_PAIRS = {"scorecam": pgc.ScoreCAM, "ablationcam": pgc.AblationCAM}
SIGN_FREE = {"eigencam", "eigengradcam"}


def full_res(cam: np.ndarray, h: int, w: int) -> np.ndarray:
    return cv2.resize(cam.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def compare(model, x: torch.Tensor, name: str, cls, hw: tuple[int, int]) -> float:  # noqa: ANN001
    ours = CamEngine(model, EngineConfig(["bn2"], [get_method(name)], options=MethodOptions(perturbation_batch=64)))
    mine = ours.maps(x, [ClassIndex(CAT)])[0].maps[0].cam
    with cls(model=model, target_layers=[model.bn2]) as cam:
        if hasattr(cam, "batch_size"):
            cam.batch_size = 64
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(CAT)])[0]
    r = pearson(full_res(mine, *hw), full_res(theirs, *hw))
    return abs(r) if name in SIGN_FREE else r


@pytest.fixture(scope="module")
def chelsea(bundled, samples):  # noqa: ANN001, ANN201
    rgb = decode(samples / "chelsea.jpg")
    return rgb, bundled.module


@pytest.mark.parametrize("name", list(GRADIENT_PAIRS))
def test_gradient_methods_agree_with_pytorch_grad_cam(chelsea, bundled, name: str) -> None:  # noqa: ANN001
    rgb, model = chelsea
    x = Preprocess(224, bundled.mean, bundled.std, True)(rgb)[None]
    r = compare(model, x, name, GRADIENT_PAIRS[name], rgb.shape[:2])
    assert r > 0.98, f"{name}: Pearson {r:.4f} with pytorch-grad-cam"


@pytest.mark.parametrize("name", list(PERTURBATION_PAIRS))
def test_perturbation_methods_agree_with_pytorch_grad_cam(chelsea, bundled, name: str) -> None:  # noqa: ANN001
    # 1280 masked forward passes each for camcli and pytorch-grad-cam: a smaller input keeps it quick.
    rgb, model = chelsea
    x = Preprocess(128, bundled.mean, bundled.std, True)(rgb)[None]
    r = compare(model, x, name, PERTURBATION_PAIRS[name], rgb.shape[:2])
    assert r > 0.98, f"{name}: Pearson {r:.4f} with pytorch-grad-cam"


def test_randomising_head_and_last_block_changes_gradcam(chelsea, bundled) -> None:  # noqa: ANN001
    rgb, model = chelsea
    x = Preprocess(224, bundled.mean, bundled.std, True)(rgb)[None]
    h, w = rgb.shape[:2]

    def gradcam(m: torch.nn.Module) -> np.ndarray:
        return full_res(CamEngine(m, EngineConfig(["bn2"], [get_method("gradcam")])).maps(x, [ClassIndex(CAT)])[0].maps[0].cam, h, w)

    trained = gradcam(model)
    rand = gradcam(randomized_copy(model, ["classifier", "blocks.6", "conv_head", "bn2"]))
    rho = spearman(trained, rand)
    assert rho < 0.5, f"Spearman {rho:.3f}: the map barely depends on the trained weights"
    assert spearman(trained, trained) == pytest.approx(1.0)


def test_spearman_by_hand() -> None:
    assert spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 30.0, 40.0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # ties get their mean rank: [1, 2.5, 2.5, 4] against [1, 2, 3, 4] -> r = 4.5 / sqrt(4.5 * 5) = 0.9487
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.9486833, abs=1e-6)
