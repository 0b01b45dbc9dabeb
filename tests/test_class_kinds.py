"""``--class not:K`` (what lowers class K) and ``--class above:T`` (every class above a probability),
worked out by hand on a feature map -> GAP -> linear model, where Grad-CAM's weights are W[c] / (h w)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from camcli.cli import app
from camcli.engine import CamEngine, EngineConfig
from camcli.errors import UsageError
from camcli.methods import get_method
from camcli.options import Activation
from camcli.targets import Above, ClassIndex, Not, TopK, class_indices, parse_class_specs

runner = CliRunner()


class GapLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(x).mean(dim=(2, 3)))


# A_1 = [[1,0],[0,0]], A_2 = [[0,0],[0,2]]; mean(A) = (0.25, 0.5).
A = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]])


def test_not_k_maps_what_lowers_class_k() -> None:
    # One output, y = 1*mean(A_1) - 0.25*mean(A_2) + 0 = 0.125. Grad-CAM of y: weights (0.25, -0.0625),
    # raw map [[0.25, 0], [0, -0.125]] -> ReLU, normalised [[1, 0], [0, 0]] (what raises y).
    # not:0 explains -y: weights (-0.25, 0.0625), raw [[-0.25, 0], [0, 0.125]] -> [[0, 0], [0, 1]].
    model = GapLinear(torch.tensor([[1.0, -0.25]]), torch.tensor([0.0]))
    engine = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")], activation=Activation.NONE))
    up, down = engine.maps(A, [ClassIndex(0), Not(0)])[0].maps
    assert up.target == 0 and np.allclose(up.cam, [[1, 0], [0, 0]])
    assert up.score == pytest.approx(0.125) and up.probability == pytest.approx(0.125)  # none: the raw value
    assert down.target is None and down.explained == {"kind": "not", "index": 0}
    assert np.allclose(down.cam, [[0, 0], [0, 1]]) and down.score == pytest.approx(-0.125)


def test_above_explains_every_class_over_the_threshold_per_image() -> None:
    # Three outputs with biases: image 0 is A (logits 0.25*w + b), image 1 is zeros (logits = b).
    # w rows: (4, 0), (0, 4), (0, 0); b = (0, -1, 0.2) -> image 0: (1, 1, 0.2), image 1: (0, -1, 0.2).
    # sigmoid: image 0 (0.7311, 0.7311, 0.5498), image 1 (0.5, 0.2689, 0.5498).
    # above:0.6 -> image 0: classes 0 and 1; image 1: none. above:0.52 -> image 1: class 2 only.
    w = torch.tensor([[4.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    model = GapLinear(w, torch.tensor([0.0, -1.0, 0.2]))
    x = torch.cat([A, torch.zeros_like(A)])
    engine = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")], activation=Activation.SIGMOID))
    first, second = engine.maps(x, [Above(0.6)])
    assert sorted(m.target for m in first.maps) == [0, 1] and second.maps == []
    probs = {m.target: m.probability for m in first.maps}
    assert probs[0] == pytest.approx(1 / (1 + np.exp(-1.0)), abs=1e-6) == probs[1]
    # class 0 looks at channel 1 only (its weight row is (4, 0)), class 1 at channel 2
    maps = {m.target: m.cam for m in first.maps}
    assert np.allclose(maps[0], [[1, 0], [0, 0]]) and np.allclose(maps[1], [[0, 0], [0, 1]])
    _, second = engine.maps(x, [Above(0.52)])
    assert [m.target for m in second.maps] == [2]


def test_class_indices_for_above_are_ranked_and_padded() -> None:
    values = torch.tensor([[0.9, 0.1, 0.7], [0.2, 0.3, 0.1]])
    assert class_indices([Above(0.5)], values).tolist() == [[0, 2], [-1, -1]]
    # a class both asked for and above the threshold is explained once
    assert class_indices([ClassIndex(2), Above(0.5)], values).tolist() == [[2, 0, -1], [2, -1, -1]]
    assert class_indices([TopK(1), Above(0.95)], values).tolist() == [[0], [1]]


def test_parse_not_and_above_and_their_errors() -> None:
    assert parse_class_specs(["not:cat", "above:0.5"], ["dog", "cat"], 2) == [Not(1), Above(0.5)]
    assert str(Not(1)) == "not:1" and str(Above(0.5)) == "above:0.5"
    for bad, says in [("above:1.5", "between 0 and 1"), ("above:0", "between 0 and 1"), ("above:x", "above:0.5"),
                      ("not:7", "out of range"), ("not:cow", "unknown class 'cow'")]:
        with pytest.raises(UsageError, match=says):
            parse_class_specs([bad], ["dog", "cat"], 2)


def test_cli_not_k_writes_its_own_file_and_says_what_it_explained(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / "a.png")
    out = tmp_path / "out"
    r = runner.invoke(app, ["explain", str(folder), "--model", "toymodels:tiny_cnn", "-o", str(out),
                            "--class", "1,not:1", "--json"])
    assert r.exit_code == 0, r.output
    record = json.loads(r.stdout)["images"][0]
    targets = {e["overlay"]: e["target"] for e in record["explanations"]}
    assert set(targets) == {"a.gradcam.1.png", "a.gradcam.not1.png"}
    plain, negated = targets["a.gradcam.1.png"], targets["a.gradcam.not1.png"]
    assert negated["kind"] == "not" and negated["index"] == 1 and negated["value"] == pytest.approx(-plain["score"])
    assert (out / "a.gradcam.not1.png").is_file()
    bad = runner.invoke(app, ["explain", str(folder), "--model", "toymodels:tiny_cnn", "-o", str(out),
                              "--class", "above:2"])
    assert bad.exit_code == 2 and "between 0 and 1" in bad.output


def test_evaluate_refuses_not_and_above(tmp_path: Path) -> None:
    """evaluate's curves follow one class's probability per image: not:K and above:T name no such class."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "a.png")
    for spec in ("not:1", "above:0.5"):
        r = runner.invoke(app, ["evaluate", str(folder), "--model", "toymodels:tiny_cnn", "--out", str(tmp_path / "ev"),
                                "--class", spec])
        assert r.exit_code == 2 and "evaluate explains one class per image" in r.output, r.output


def test_score_probability_explains_the_softmax_probability_by_hand() -> None:
    # W rows (2, 1), (0, 0), (-1, -1), no bias; mean(A) = (0.25, 0.5) -> logits (1, 0, -0.75).
    # d p_0 / d A_k(i,j) = p_0 (W_0k - sum_j p_j W_jk) / 4: Grad-CAM's weights for the probability.
    # The logit's map has weights (2, 1) / 4: [[0.5, 0], [0, 0.5]] -> [[1, 0], [0, 1]]; the
    # probability's weighs channel 1 against the classes' mean, so its two pixels differ.
    w = torch.tensor([[2.0, 1.0], [0.0, 0.0], [-1.0, -1.0]])
    model = GapLinear(w, torch.zeros(3))
    p = torch.softmax(torch.tensor([1.0, 0.0, -0.75]), dim=0).numpy()
    alpha = p[0] * (w[0].numpy() - p @ w.numpy()) / 4
    raw = np.array([[alpha[0] * 1.0, 0.0], [0.0, alpha[1] * 2.0]])
    expected = np.maximum(raw, 0) / np.maximum(raw, 0).max()
    logit = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")]))
    prob = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")], explain_probability=True))
    by_logit, by_prob = logit.maps(A, [ClassIndex(0)])[0].maps[0], prob.maps(A, [ClassIndex(0)])[0].maps[0]
    assert np.allclose(by_logit.cam, [[1, 0], [0, 1]])
    assert np.allclose(by_prob.cam, expected, atol=1e-6) and not np.allclose(by_prob.cam, by_logit.cam)
    assert by_prob.score == pytest.approx(float(p[0]), abs=1e-6) and by_logit.score == pytest.approx(1.0)
    # sigmoid: d s(y_0) = s (1 - s) W_0 / 4, a positive multiple of the logit's: the same map, its own value
    sig = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")], activation=Activation.SIGMOID,
                                        explain_probability=True))
    m = sig.maps(A, [ClassIndex(0)])[0].maps[0]
    assert np.allclose(m.cam, by_logit.cam, atol=1e-6) and m.score == pytest.approx(1 / (1 + np.exp(-1.0)), abs=1e-6)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_score_probability_and_not_agree_with_pytorch_grad_cams_targets() -> None:
    """ClassifierOutputSoftmaxTarget is --score probability (softmax); BinaryClassifierOutputTarget(1)
    and (0) on a one-output model are --class 0 and --class not:0. No deviation: both are the same
    scalar; pytorch-grad-cam adds 1e-7 to its min-max division."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget, ClassifierOutputSoftmaxTarget

    from toymodels import TinyCNN

    torch.manual_seed(3)
    x = torch.randn(1, 3, 32, 32)
    for classes, spec, theirs_target, through in [
        (4, ClassIndex(2), ClassifierOutputSoftmaxTarget(2), True),
        (1, ClassIndex(0), BinaryClassifierOutputTarget(1), False),
        (1, Not(0), BinaryClassifierOutputTarget(0), False),
    ]:
        model = TinyCNN(num_classes=classes).eval()
        engine = CamEngine(model, EngineConfig(["features.3"], [get_method("gradcam")], explain_probability=through,
                                               activation=Activation.SOFTMAX if classes > 1 else Activation.NONE))
        mine = engine.maps(x, [spec])[0].maps[0].cam
        with pgc.GradCAM(model=model, target_layers=[model.features[3]]) as cam:
            theirs = cam(input_tensor=x, targets=[theirs_target])[0]
        full = cv2.resize(mine, theirs.shape[::-1], interpolation=cv2.INTER_LINEAR)  # as pytorch-grad-cam scales
        assert mine.max() > 0 and _pearson(full, theirs) > 0.99, (spec, theirs_target)


def test_gradcam_of_not_k_is_the_counterfactual_method() -> None:
    """Selvaraju et al.'s counterfactual map negates the gradients of y^K; not:K negates y^K itself."""
    from toymodels import TinyCNN

    torch.manual_seed(5)
    model, x = TinyCNN().eval(), torch.randn(2, 3, 32, 32)
    grad = CamEngine(model, EngineConfig(["features.3"], [get_method("gradcam")])).maps(x, [Not(1)])
    counter = CamEngine(model, EngineConfig(["features.3"], [get_method("counterfactual")])).maps(x, [ClassIndex(1)])
    for a, b in zip(grad, counter):
        assert b.maps[0].cam.max() > 0 and np.allclose(a.maps[0].cam, b.maps[0].cam, atol=1e-6)
