"""Finer-CAM: a contrast target, checked by hand on a GAP -> linear head and against torchcam."""

from __future__ import annotations

import numpy as np
import torch

from camcli.engine import CamEngine, EngineConfig, finalize
from camcli.methods import MethodOptions, get_method
from camcli.targets import ClassIndex, ClassTarget, contrast
from toymodels import TinyCNN


def _model(classes: int = 6) -> TinyCNN:
    torch.manual_seed(4)
    return TinyCNN(num_classes=classes).eval()


def _finercam(model: torch.nn.Module, x: torch.Tensor, target: int, **opts: object) -> np.ndarray:
    info = get_method("finercam")
    mopts = MethodOptions(**opts)  # type: ignore[arg-type]
    engine = CamEngine(model, EngineConfig(["features"], [info.derive(mopts)], options=mopts))
    return engine.maps(x, [ClassIndex(target)])[0].maps[0].cam


def test_references_are_the_closest_scores_without_the_target() -> None:
    logits = torch.tensor([[5.0, 4.8, 1.0, 5.1, 4.0, -3.0]])
    t = contrast(ClassTarget(torch.tensor([0])), logits, references=3, alpha=0.6)
    assert sorted(t.references[0].tolist()) == [1, 3, 4]  # |d| = 0.2, 0.1, 1.0; class 0 itself excluded
    expected = 5.0 - 0.6 * (4.8 + 5.1 + 4.0) / 3
    assert t.score(logits, torch.tensor([0])).item() == torch.tensor(expected).item()
    few = contrast(ClassTarget(torch.tensor([0])), logits[:, :2], references=3, alpha=0.6)
    assert few.references.tolist() == [[1]]  # capped by the classes there are


def test_finercam_on_a_gap_linear_head_equals_the_contrast_of_classifier_weights() -> None:
    """With GAP -> linear, dy/dA_k = w_k / hw, so Grad-CAM of the contrast weighs channel k by
    W[c,k] - alpha * mean_r W[r,k]: computed here from the weights alone."""
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = model.features(x)
        logits = model(x)
    c = int(logits.argmax())
    d = (logits[0] - logits[0, c]).abs()
    d[c] = float("inf")
    refs = d.topk(3, largest=False).indices
    w = model.fc.weight.detach()
    weights = w[c] - 0.6 * w[refs].mean(dim=0)
    expected = finalize((weights[None, :, None, None] * a).sum(dim=1))[0][0].numpy()
    np.testing.assert_allclose(_finercam(model, x, c), expected, atol=1e-5)
    plain = CamEngine(model, EngineConfig(["features"], [get_method("gradcam")])).maps(x, [ClassIndex(c)])[0].maps[0].cam
    assert not np.allclose(plain, expected, atol=1e-3)  # the contrast is a different map


def test_alpha_zero_is_the_base_method() -> None:
    model = _model()
    x = torch.randn(2, 3, 32, 32)
    for base in ("gradcam", "layercam", "scorecam"):
        ours = _finercam(model, x, 1, finer_base=base, finer_alpha=0.0)
        plain = CamEngine(model, EngineConfig(["features"], [get_method(base)])).maps(x, [ClassIndex(1)])[0].maps[0].cam
        np.testing.assert_allclose(ours, plain, atol=1e-5)


def test_agrees_with_torchcam() -> None:
    """torchcam's FinerCAM has the same definition (gamma 0.6, the 3 closest scores)."""
    from torchcam.methods import FinerCAM, GradCAM

    model = _model()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        c = int(model(x).argmax())
    ours = _finercam(model, x, c)
    with FinerCAM(model, "features", input_shape=(3, 40, 40), base_method=GradCAM) as extractor:
        scores = model(x)
        theirs = extractor(class_idx=c, scores=scores)[0][0].detach().numpy()
    r = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    assert r > 0.99, r


def test_pytorch_grad_cam_weights_each_reference_by_its_probability() -> None:
    """Named deviation: pytorch-grad-cam's FinerWeightedTarget averages y^c - alpha y^r over the
    references weighted by their softmax probabilities (and defaults to alpha 1), where the paper and
    torchcam subtract alpha times the plain mean. With equal reference probabilities the two agree."""
    from pytorch_grad_cam.utils.model_targets import FinerWeightedTarget

    out = torch.tensor([2.0, 1.0, 1.0, -5.0])
    ours = contrast(ClassTarget(torch.tensor([0])), out[None], references=2, alpha=0.6).score(out[None], torch.tensor([0]))
    theirs = FinerWeightedTarget(0, [1, 2], 0.6)(out)
    assert abs(float(ours) - float(theirs)) < 1e-6  # equal probabilities: the same number
    skewed = torch.tensor([2.0, 1.5, 0.5, -5.0])
    ours = contrast(ClassTarget(torch.tensor([0])), skewed[None], references=2, alpha=0.6).score(skewed[None], torch.tensor([0]))
    theirs = FinerWeightedTarget(0, [1, 2], 0.6)(skewed)
    assert abs(float(ours) - float(theirs)) > 0.05
