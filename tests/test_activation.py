"""--activation: how outputs become the records' numbers, the top-k ranking and evaluate's curves.

The models are built here: a 1x1 convolution averaging the three channels, global average pooling
and a linear head. Inputs are normalised with mean 0 and std 1, so a uniform grey image of value 51
feeds the head 51 / 255 = 0.2, and every output is worked out by hand from the head's weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from camcli import metrics as M
from camcli.activation import probabilities, resolve
from camcli.cli import app
from camcli.errors import UsageError
from camcli.evaluate import evaluate
from camcli.models import load_model
from camcli.options import Activation, EvaluateOptions, ExplainOptions
from camcli.pipeline import run_explain
from camcli.records import load_run
from camcli.session import Session

runner = CliRunner()
ONE = "test_activation:one_output"  # -0.6 on the grey image: 2 * 0.2 - 1
THREE = "test_activation:three_outputs"  # [2, 1, -1] on the grey image


class GapHead(nn.Module):
    """mean of the channels (1x1 conv, weights 1/3) -> global average pool -> Linear(1, n)."""

    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)
    input_size = 16

    def __init__(self, weight: list[float], bias: list[float]) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 1, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(1, len(weight))
        with torch.no_grad():
            self.features.weight.fill_(1 / 3)
            self.head.weight.copy_(torch.tensor(weight)[:, None])
            self.head.bias.copy_(torch.tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def one_output() -> nn.Module:
    return GapHead([2.0], [-1.0])


def three_outputs() -> nn.Module:
    return GapHead([10.0, 0.0, 5.0], [0.0, 1.0, -2.0])


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# By hand: sigmoid(-0.6) = 1 / (1 + e^0.6) = 1 / 2.8221188 = 0.3543437
SIGMOID_ONE = 0.354344
# By hand, logits [2, 1, -1]: sigmoids 1/(1+e^-2), 1/(1+e^-1), 1/(1+e^1); softmax e^z / (e^2 + e + e^-1) = z / 10.4757
SIGMOIDS_THREE = [0.880797, 0.731059, 0.268941]
SOFTMAX_THREE = [0.705385, 0.259496, 0.035119]


@pytest.fixture
def grey(tmp_path: Path) -> Path:
    p = tmp_path / "in" / "grey.png"
    p.parent.mkdir()
    Image.fromarray(np.full((16, 16, 3), 51, np.uint8)).save(p)
    return p


def _explain(grey: Path, out: Path, model: str, **kw: Any) -> dict[str, Any]:  # noqa: ANN401
    res = run_explain([grey], ExplainOptions(model=model, out=str(out), workers=0, quiet=True, **kw))
    assert res.exit_code == 0
    return load_run(out)


def test_hand_values_are_what_the_model_outputs() -> None:
    x = torch.full((1, 3, 16, 16), 51 / 255)
    np.testing.assert_allclose(one_output()(x).detach().numpy(), [[-0.6]], atol=1e-6)
    np.testing.assert_allclose(three_outputs()(x).detach().numpy(), [[2.0, 1.0, -1.0]], atol=1e-6)
    assert round(sigmoid(-0.6), 6) == SIGMOID_ONE and [round(sigmoid(v), 6) for v in (2, 1, -1)] == SIGMOIDS_THREE
    total = math.exp(2) + math.exp(1) + math.exp(-1)
    assert [round(math.exp(v) / total, 6) for v in (2, 1, -1)] == SOFTMAX_THREE


@pytest.mark.parametrize(
    "kw,expected",
    [
        ({"outputs": 1}, Activation.NONE),  # a regressor, or a logit nobody named: the raw value
        ({"outputs": 1, "named": True}, Activation.SIGMOID),  # a label names the one output: binary
        ({"outputs": 1, "named": True, "problem_type": "regression"}, Activation.NONE),  # the config says regression
        ({"outputs": 3, "problem_type": "multi_label_classification"}, Activation.SIGMOID),
        ({"outputs": 3, "problem_type": "single_label_classification"}, Activation.SOFTMAX),
        ({"outputs": 3, "problem_type": "regression"}, Activation.NONE),
        ({"outputs": 1000, "named": True}, Activation.SOFTMAX),  # a normal classifier
        ({"outputs": 4, "task": "segmentation"}, None),  # pixel shares
    ],
)
def test_auto_resolution(kw: dict[str, Any], expected: Activation | None) -> None:
    assert resolve("auto", **kw) is expected


def test_given_activation_wins_and_segmentation_refuses_sigmoid_and_none() -> None:
    assert resolve("none", outputs=1000, named=True) is Activation.NONE
    assert resolve(Activation.SIGMOID, outputs=1) is Activation.SIGMOID
    assert resolve("softmax", outputs=4, task="segmentation") is None
    for value in ("sigmoid", "none"):
        with pytest.raises(UsageError, match=f"--activation {value} is for classifiers"):
            resolve(value, outputs=4, task="segmentation")
    with pytest.raises(UsageError, match="--activation sigmoid is for classifiers"):
        Session.open(ExplainOptions(model="toymodels:tiny_seg", activation="sigmoid", quiet=True))
    seg = Session.open(ExplainOptions(model="toymodels:tiny_seg", quiet=True))
    assert seg.activation is None and seg.record()["activation"] is None and seg.value_key == "pixel_share"
    assert "activation" not in seg.shaping()


def test_probabilities_by_hand() -> None:
    z = torch.tensor([[2.0, 1.0, -1.0]])
    np.testing.assert_allclose(probabilities(z, Activation.SOFTMAX)[0].numpy(), SOFTMAX_THREE, atol=1e-6)
    np.testing.assert_allclose(probabilities(z, Activation.SIGMOID)[0].numpy(), SIGMOIDS_THREE, atol=1e-6)
    assert probabilities(z, Activation.NONE).tolist() == [[2.0, 1.0, -1.0]]


def test_one_output_record_shows_its_raw_value_or_its_sigmoid_never_one(grey: Path, tmp_path: Path) -> None:
    runs = {
        "auto": _explain(grey, tmp_path / "auto", ONE),
        "sigmoid": _explain(grey, tmp_path / "sigmoid", ONE, activation="sigmoid"),
        "softmax": _explain(grey, tmp_path / "softmax", ONE, activation="softmax"),
    }
    auto = runs["auto"]  # no label names the output: a regressor's raw value
    assert auto["options"]["activation"] == "none" and auto["shaping"]["activation"] == "none"
    pred = auto["images"][0]["predictions"]
    assert len(pred) == 1 and pred[0]["index"] == 0 and "probability" not in pred[0]
    assert pred[0]["value"] == pytest.approx(-0.6, abs=1e-6)
    target = auto["images"][0]["explanations"][0]["target"]
    assert target["value"] == pytest.approx(-0.6, abs=1e-6) and target["score"] == pytest.approx(-0.6, abs=1e-6)

    sig = runs["sigmoid"]
    assert sig["options"]["activation"] == "sigmoid" and sig["shaping"]["activation"] == "sigmoid"
    assert sig["images"][0]["predictions"][0]["probability"] == pytest.approx(SIGMOID_ONE, abs=1e-6)
    target = sig["images"][0]["explanations"][0]["target"]
    assert target["probability"] == pytest.approx(SIGMOID_ONE, abs=1e-6) and target["score"] == pytest.approx(-0.6, abs=1e-6)

    # softmax over one output is 1 whatever the model says: only when asked for, and not resolved into the fingerprint
    soft = runs["softmax"]
    assert soft["images"][0]["predictions"][0]["probability"] == 1.0 and "activation" not in soft["shaping"]
    assert len({r["fingerprint"] for r in runs.values()}) == 3


def test_one_output_named_by_a_labels_file_is_read_through_sigmoid(grey: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("defective\n")
    run = _explain(grey, tmp_path / "out", ONE, labels=str(labels))
    assert run["options"]["activation"] == "sigmoid"
    assert run["images"][0]["predictions"] == [{"index": 0, "label": "defective", "probability": SIGMOID_ONE}]


def test_softmax_on_one_output_warns(grey: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["explain", str(grey), "--model", ONE, "--activation", "softmax", "--workers", "0",
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "--activation softmax on a model with one output: its probability is always 1" in r.output


def test_sigmoid_gives_independent_probabilities_and_ranks_by_them(grey: Path, tmp_path: Path) -> None:
    sig = _explain(grey, tmp_path / "sig", THREE, activation="sigmoid", classes=["top3"])
    pred = sig["images"][0]["predictions"]
    assert [p["index"] for p in pred] == [0, 1, 2]  # sigmoid is monotone: the ranks are the logits'
    assert [p["probability"] for p in pred] == SIGMOIDS_THREE  # each its own sigmoid: they add up to 1.880797
    by_target = {e["target"]["index"]: e["target"]["probability"] for e in sig["images"][0]["explanations"]}
    assert by_target == dict(enumerate(SIGMOIDS_THREE))

    soft = _explain(grey, tmp_path / "soft", THREE, classes=["top3"])  # auto: three outputs, no config -> softmax
    assert soft["options"]["activation"] == "softmax" and "activation" not in soft["shaping"]
    assert [p["probability"] for p in soft["images"][0]["predictions"]] == SOFTMAX_THREE
    explicit = _explain(grey, tmp_path / "explicit", THREE, classes=["top3"], activation="softmax")
    assert explicit["fingerprint"] == soft["fingerprint"] != sig["fingerprint"]


def test_hugging_face_multi_label_config_resolves_to_sigmoid(tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=3, problem_type="multi_label_classification",
    )
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert (lm.source, lm.problem_type, lm.num_classes) == ("huggingface", "multi_label_classification", 3)
    session = Session.open(ExplainOptions(model=str(tmp_path), quiet=True), model=lm)
    assert session.activation is Activation.SIGMOID and session.engine.config.activation is Activation.SIGMOID
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    logits = session.logits(x)
    out = session.engine.maps(x, session.specs)
    for i, o in enumerate(out):
        expected = sorted(((c, float(torch.sigmoid(logits[i, c]))) for c in range(3)), key=lambda t: -t[1])
        assert [c for c, _ in o.top] == [c for c, _ in expected]
        np.testing.assert_allclose([p for _, p in o.top], [p for _, p in expected], atol=1e-5)


def test_target_probability_and_batcher_use_the_activation() -> None:
    z = torch.tensor([[2.0, 1.0, -1.0], [2.0, 1.0, -1.0]])
    classes = torch.tensor([0, 2])
    np.testing.assert_allclose(M.target_probability(z, classes).numpy(), [SOFTMAX_THREE[0], SOFTMAX_THREE[2]], atol=1e-6)
    np.testing.assert_allclose(M.target_probability(z, classes, Activation.SIGMOID).numpy(),
                               [SIGMOIDS_THREE[0], SIGMOIDS_THREE[2]], atol=1e-6)
    assert M.target_probability(z, classes, Activation.NONE).tolist() == [2.0, -1.0]

    def logits(x: torch.Tensor) -> torch.Tensor:  # a constant image's channel values are its logits
        return x.mean(dim=(2, 3))

    image = torch.tensor([2.0, 1.0, -1.0])[:, None, None].expand(3, 4, 4)
    for activation, expected in [(Activation.SIGMOID, SIGMOIDS_THREE[1]), (Activation.NONE, 1.0),
                                 (Activation.SOFTMAX, SOFTMAX_THREE[1])]:
        batcher = M.Batcher(logits, 2, activation=activation)
        job = batcher.add((3, lambda i: image), 1, image)
        batcher.run()
        np.testing.assert_allclose(job.result.numpy(), [expected] * 3, atol=1e-6)


@pytest.mark.parametrize("activation,key,value", [("none", "value", -0.6), ("sigmoid", "probability", SIGMOID_ONE)])
def test_evaluate_reads_the_one_output_through_the_activation(grey: Path, tmp_path: Path, activation: str, key: str,
                                                              value: float) -> None:
    out = tmp_path / activation
    res = evaluate([grey], EvaluateOptions(model=ONE, out=str(out), metric="deletion_auc,insertion_auc", steps=4,
                                           activation=activation, quiet=True))
    assert res.exit_code == 0
    rec = next(res.records())
    assert rec["target"][key] == pytest.approx(value, abs=1e-6)
    # A uniform image: deleting pixels (its mean colour) and inserting them (into its blur) change nothing,
    # so every curve point is the output under the activation, and so is its area (softmax would say 1).
    metrics = rec["metrics"]["gradcam"]
    for name in ("deletion_auc", "insertion_auc"):
        got = metrics[name]["value"] if isinstance(metrics[name], dict) else metrics[name]
        assert got == pytest.approx(value, abs=1e-5)
    assert json.loads(res.path.read_text())["options"]["activation"] == activation


@pytest.mark.parametrize("command", ["explain", "evaluate"])
def test_an_unknown_activation_is_exit_2_naming_the_accepted_values(grey: Path, tmp_path: Path, command: str) -> None:
    r = runner.invoke(app, [command, str(grey), "--model", "toymodels:tiny_cnn", "--activation", "tanh",
                            "--out", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 2
    assert "--activation 'tanh' is not one of auto, softmax, sigmoid, none" in r.output


def test_auto_is_none_when_the_run_explains_a_reference_or_a_callable() -> None:
    """An embedding's outputs are no class logits: ranking them through softmax would mean nothing."""
    assert resolve(Activation.AUTO, outputs=8, scalar_target=True) is Activation.NONE
    assert resolve(Activation.SIGMOID, outputs=8, scalar_target=True) is Activation.SIGMOID  # asked for
    assert resolve(Activation.AUTO, outputs=8) is Activation.SOFTMAX


def test_evaluate_scores_a_scalar_target_through_its_curves(grey: Path, tmp_path: Path) -> None:
    """--target in evaluate: every curve follows the callable's value, not a class probability. On the
    grey image the outputs are [2, 1, -1], so second_minus_first is 1 - 2 = -1 (auto activation: none);
    deleting or inserting pixels of a uniform image changes nothing, so each curve's area is -1 too."""
    res = evaluate([grey], EvaluateOptions(model=THREE, out=str(tmp_path / "ev"), metric="deletion_auc,insertion_auc",
                                           steps=4, target="toymodels:second_minus_first", quiet=True))
    assert res.exit_code == 0
    rec = next(res.records())
    assert rec["target"] == {"kind": "callable", "callable": "toymodels:second_minus_first", "value": -1.0}
    for name in ("deletion_auc", "insertion_auc"):
        got = rec["metrics"]["gradcam"][name]
        assert (got["value"] if isinstance(got, dict) else got) == pytest.approx(-1.0, abs=1e-5)
    with pytest.raises(UsageError, match="not a class: drop --class"):
        evaluate([grey], EvaluateOptions(model=THREE, out=str(tmp_path / "ev2"), classes=("1",),
                                         target="toymodels:second_minus_first", quiet=True))


def test_the_batcher_scores_a_scalar_of_the_output() -> None:
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    batcher = M.Batcher(lambda x: model(x).detach(), batch=2, scalar=lambda out: out[:, 2] - out[:, 0])
    job = batcher.add((3, lambda i: torch.tensor([float(i), 2.0])), 0, torch.zeros(2))
    batcher.run()
    # out = (i, 2, i + 2): out[2] - out[0] = 2 for every input, whatever its class
    assert job.result.tolist() == [2.0, 2.0, 2.0]
