"""Hooks are removed on every path; the model's flags and modes come back unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from camcli.engine import CamEngine, EngineConfig
from camcli.hooks import LayerTap, frozen
from camcli.methods import get_method
from camcli.targets import TopK
from toymodels import tiny_cnn


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_run_leaves_no_hooks_and_restores_flags_and_mode() -> None:
    model = tiny_cnn()
    model.train()
    model.fc.weight.requires_grad_(False)  # a mixed state that must come back exactly
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    engine = CamEngine(model, EngineConfig(["features.2"], [get_method("gradcam"), get_method("gradcam++")]))
    engine.maps(torch.randn(2, 3, 32, 32), [TopK(2)])
    assert hook_count(model) == 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters()), "no parameter gradients may be computed"


def test_hooks_removed_when_the_forward_raises() -> None:
    model = tiny_cnn()
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    engine = CamEngine(model, EngineConfig(["features.2"], [get_method("gradcam")]))
    with pytest.raises(RuntimeError):
        engine.maps(torch.randn(1, 5, 32, 32), [TopK(1)])  # wrong channel count
    assert hook_count(model) == 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training


def test_layer_tap_removes_hooks_on_exception() -> None:
    model = tiny_cnn()
    with pytest.raises(ValueError):
        with frozen(model), LayerTap(model, ["features.0", "fc"]):
            assert hook_count(model) == 2
            raise ValueError("boom")
    assert hook_count(model) == 0


def test_inplace_relu_after_target_layer_keeps_activation_and_gradient() -> None:
    # features.2 (conv) is followed by ReLU(inplace=True): the recorded activation must be the
    # conv's output (with negatives), not the ReLU'd tensor, and autograd must not complain.
    model = tiny_cnn().eval()
    x = torch.randn(2, 3, 32, 32)
    seen = {}

    def spy(inputs):  # noqa: ANN001, ANN202
        seen["a"] = inputs.activations.clone()
        seen["g"] = inputs.gradients.clone()
        return inputs.activations.sum(1)

    from camcli.methods.base import MethodInfo

    CamEngine(model, EngineConfig(["features.2"], [MethodInfo("spy", spy, "", "", needs_gradients=True)])).maps(x, [TopK(1)])
    with torch.no_grad():
        conv_out = model.features[2](model.features[1](model.features[0](x)))
    assert torch.allclose(seen["a"], conv_out, atol=1e-6)
    assert (seen["a"] < 0).any()
    # reference gradient, taken by hand on the head above the layer
    xa = conv_out.clone().requires_grad_(True)
    logits = model.fc(torch.relu(xa).mean(dim=(2, 3)))
    c = logits.argmax(1)
    ref = torch.autograd.grad(logits.gather(1, c[:, None]).sum(), xa)[0]
    assert torch.allclose(seen["g"], ref, atol=1e-6)
