"""Grad-CAM against values worked out by hand, and against CAM on a GAP -> linear head."""

from __future__ import annotations

import torch
from torch import nn

from camcli.engine import CamEngine, EngineConfig, finalize
from camcli.methods import CamInputs, get_method
from camcli.targets import ClassIndex, TopK


class GapLinear(nn.Module):
    """Input is taken as the feature map itself: feat (identity) -> GAP -> linear."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=True)
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.fill_(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(x).mean(dim=(2, 3)))


def test_gradcam_on_paper_two_channel_2x2() -> None:
    # A_1 = [[1,0],[0,0]], A_2 = [[0,0],[0,2]], class-0 weights (1, -0.25).
    # y = w . mean(A) + b  =>  G_k = w_k / 4 everywhere  =>  Grad-CAM weights (0.25, -0.0625)
    # raw map = 0.25*A_1 - 0.0625*A_2 = [[0.25, 0], [0, -0.125]]; after ReLU + norm: [[1,0],[0,0]].
    a = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]])
    model = GapLinear(torch.tensor([[1.0, -0.25], [0.0, 1.0]]))
    engine = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")]))
    out = engine.maps(a, [ClassIndex(0)])[0]
    assert out.maps[0].target == 0
    assert torch.allclose(torch.from_numpy(out.maps[0].cam), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    # the raw, un-normalised weighted activations w_k A_k from the method itself
    g = torch.full_like(a, 0.0)
    g[0, 0], g[0, 1] = 0.25, -0.0625
    raw = get_method("gradcam").fn(CamInputs(activations=a, targets=torch.tensor([0]), gradients=g))
    assert torch.allclose(raw[0, 0], 0.25 * a[0, 0]) and torch.allclose(raw[0, 1], -0.0625 * a[0, 1])
    assert torch.allclose(raw.sum(dim=1), torch.tensor([[[0.25, 0.0], [0.0, -0.125]]]))
    # class 1 looks only at channel 2: map is [[0,0],[0,1]]
    out1 = engine.maps(a, [ClassIndex(1)])[0]
    assert torch.allclose(torch.from_numpy(out1.maps[0].cam), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_engine_gradients_equal_hand_derivative() -> None:
    # Grad-CAM on GAP -> linear: G_kij = W_ck / (h*w) exactly, whatever A is.
    torch.manual_seed(1)
    w = torch.randn(3, 5)
    model = GapLinear(w)
    a = torch.rand(2, 5, 3, 4)
    captured = {}

    def spy(inputs: CamInputs) -> torch.Tensor:
        captured["g"] = inputs.gradients
        return inputs.activations.sum(1)

    from camcli.methods.base import MethodInfo

    info = MethodInfo(name="spy", fn=spy, description="", paper="", needs_gradients=True)
    CamEngine(model, EngineConfig(["feat"], [info])).maps(a, [ClassIndex(2)])
    expected = (w[2] / 12.0).view(1, 5, 1, 1).expand(2, 5, 3, 4)
    assert torch.allclose(captured["g"], expected, atol=1e-7)


def test_gradcam_equals_cam_on_gap_linear_conv_net() -> None:
    from toymodels import tiny_cnn

    model = tiny_cnn().eval()
    x = torch.randn(3, 3, 32, 48)
    engine = CamEngine(model, EngineConfig(["features.3"], [get_method("gradcam")]))
    outs = engine.maps(x, [TopK(1)])
    with torch.no_grad():
        a = model.features(x)
        logits = model(x)
    c = logits.argmax(1)
    cam = torch.einsum("bk,bkhw->bhw", model.fc.weight[c], a)
    expected, _, _ = finalize(cam)
    for i, o in enumerate(outs):
        assert o.maps[0].target == int(c[i])
        assert torch.allclose(torch.from_numpy(o.maps[0].cam), expected[i], atol=1e-5)
