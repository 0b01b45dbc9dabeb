"""Layouts checked on paper: hand-built token and channels-last tensors, detection, errors, and the
engine seeing the same (B, C, h, w) map through a token layer as through the equivalent CNN layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from camcli.engine import CamEngine, EngineConfig
from camcli.errors import UsageError
from camcli.layouts import NCHW, NHWC, ModelHints, Tokens, detect, infer_grid, parse_layout
from camcli.methods import get_method
from camcli.targets import ClassIndex
from test_gradcam_golden import GapLinear


def coded_tokens(prefix: int, gh: int, gw: int, c: int) -> torch.Tensor:
    """(1, prefix + gh*gw, c): patch token (r, col) channel k holds 100k + 10r + col; prefix tokens -1."""
    grid = torch.tensor([[[100.0 * k + 10 * r + col for k in range(c)] for col in range(gw)] for r in range(gh)])
    return torch.cat([torch.full((prefix, c), -1.0), grid.reshape(gh * gw, c)])[None]


def test_tokens_to_nchw_by_hand_drops_prefix_and_keeps_row_major_order() -> None:
    t = coded_tokens(prefix=2, gh=2, gw=3, c=2)
    a = Tokens(2, (2, 3)).to_nchw(t)
    assert a.shape == (1, 2, 2, 3)
    assert a[0, 1, 1, 2] == 112.0  # channel 1, row 1, column 2
    assert a[0, 0, 0, 1] == 1.0 and a[0, 0, 1, 0] == 10.0  # along a row first, then down
    assert (a >= 0).all()  # no prefix token made it into the grid


def test_tokens_round_trip_restores_prefix_from_the_original() -> None:
    t = coded_tokens(prefix=2, gh=2, gw=3, c=2)
    lay = Tokens(2, (2, 3))
    assert torch.equal(lay.from_nchw(lay.to_nchw(t), like=t), t)
    # a batch of 3 edited maps of one image: each gets the image's prefix tokens back
    edited = lay.to_nchw(t).repeat(3, 1, 1, 1)
    edited[1, 0] = 0
    back = lay.from_nchw(edited, like=t)
    assert back.shape == (3, 8, 2) and torch.equal(back[:, :2], t[:, :2].expand(3, -1, -1))
    assert torch.equal(back[1, 2:, 0], torch.zeros(6)) and torch.equal(back[1, 2:, 1], t[0, 2:, 1])
    with pytest.raises(ValueError, match="prefix tokens"):
        lay.from_nchw(edited)


def test_nhwc_permute_by_hand_and_round_trip() -> None:
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)  # (B, h, w, C)
    a = NHWC().to_nchw(t)
    assert a.shape == (1, 4, 2, 3) and a[0, 3, 1, 2] == t[0, 1, 2, 3]
    assert torch.equal(NHWC().from_nchw(a), t)
    assert NCHW().to_nchw(t) is t


def test_grid_follows_the_input_aspect_ratio() -> None:
    assert Tokens(1).bind((1, 7, 4), (32, 48)) == Tokens(1, (2, 3))
    assert Tokens(1).bind((1, 7, 4), (48, 32)) == Tokens(1, (3, 2))
    # from the patch size: floor (no padding) or ceil (padded) of input / patch
    assert Tokens(1, patch=(16, 16)).bind((1, 1 + 14 * 21, 8), (224, 336)).grid == (14, 21)
    assert Tokens(0, patch=(16, 16)).bind((1, 14 * 22, 8), (224, 337)).grid == (14, 22)
    assert infer_grid(50, (224, 224)) is None  # 5x10 or 10x5 disagree with a square input


def test_detect_layouts_from_shapes_and_hints() -> None:
    assert detect((1, 197, 192), (224, 224)) == Tokens(1, (14, 14))
    assert detect((1, 201, 192), (224, 224)) == Tokens(5, (14, 14))  # class + 4 registers
    assert detect((1, 7, 7, 768), (224, 224)) == NHWC()
    assert detect((1, 768, 7, 7), (224, 224)) == NCHW()
    assert detect((1, 7, 7, 7), (224, 224)) == NCHW()  # both readings fit: NCHW unless the model is NHWC
    assert detect((1, 7, 7, 7), (224, 224), ModelHints(channels_last=True)) == NHWC()
    # per-head queries (B, heads, N, head_dim) in a ViT are no grid; a CNN's 4-D output stays NCHW
    vit = ModelHints(prefix=1, patch=(8, 8), family="vit")
    assert detect((1, 2, 17, 16), (32, 32), vit) is None and detect((1, 32, 4, 4), (32, 32), vit) == NCHW()
    assert detect((1, 2, 17, 16), (32, 32)) == NCHW()
    # DeiT: 2 prefix tokens from the model; its patch embedding's output has none
    deit = ModelHints(prefix=2, patch=(16, 16))
    assert detect((1, 198, 192), (224, 224), deit) == Tokens(2, (14, 14), (16, 16))
    assert detect((1, 196, 192), (224, 224), deit) == Tokens(0, (14, 14), (16, 16))
    # 20 tokens on 32x32: 4 prefix + 4x4, or 16 prefix + 2x2; no hint decides -> not guessed
    assert detect((1, 20, 8), (32, 32)) is None
    assert detect((1, 16, 1), (32, 32)) is None  # a pooled (B, C, 1): one channel is no token map


def test_parse_layout_accepts_three_forms_and_names_bad_values() -> None:
    assert parse_layout("NCHW") == NCHW() and parse_layout(" nhwc ") == NHWC()
    assert parse_layout("tokens:3") == Tokens(3)
    with pytest.raises(UsageError, match=r"'nwhc'.*accepted: nchw, nhwc or tokens:P"):
        parse_layout("nwhc")
    with pytest.raises(UsageError, match=r"'tokens'.*tokens:0 for none, tokens:1 for a class token"):
        parse_layout("tokens")
    with pytest.raises(UsageError, match="'tokens:-1'"):
        parse_layout("tokens:-1")


class TokenGapLinear(nn.Module):
    """GapLinear through tokens: a (B, C, h, w) input becomes [cls, patches] tokens; the head averages
    the patch tokens. Grad-CAM at ``feat`` must therefore equal GapLinear's map on the same input."""

    def __init__(self, weight: torch.Tensor, nhwc: bool = False) -> None:
        super().__init__()
        self.ref = GapLinear(weight)
        self.nhwc = nhwc
        self.cls = nn.Parameter(torch.full((1, 1, weight.shape[1]), 5.0))
        self.feat = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            return self.ref.fc(self.feat(x.permute(0, 2, 3, 1)).mean(dim=(1, 2)))
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        return self.ref.fc(self.feat(tokens)[:, 1:].mean(dim=1))


W = torch.tensor([[1.0, -0.25], [0.0, 1.0]])
# A 2x3 two-channel map whose answer is not symmetric: a transposed grid would show.
A23 = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]], [[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]]])


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam", "hirescam"])
@pytest.mark.parametrize("kind", ["tokens", "nhwc"])
def test_token_and_nhwc_layers_give_the_cnn_map(method: str, kind: str) -> None:
    ref = CamEngine(GapLinear(W), EngineConfig(["feat"], [get_method(method)], signed=True))
    expected = ref.maps(A23, [ClassIndex(0)])[0].maps[0].cam
    model = TokenGapLinear(W, nhwc=kind == "nhwc")
    engine = CamEngine(model, EngineConfig(["feat"], [get_method(method)], signed=True, layout="tokens:1" if kind == "tokens" else None))
    engine.check(A23)
    got = engine.maps(A23, [ClassIndex(0)])[0].maps[0].cam
    assert got.shape == (2, 3)
    assert np.allclose(got, expected, atol=1e-6)
    # Grad-CAM by hand: G = w / 6 everywhere, so the map is 1*A1 - 0.25*A2 = [[1, -.5, 0], [0, 0, 3]] / 3
    if method == "gradcam":
        assert np.allclose(got, np.array([[1.0, -0.5, 0.0], [0.0, 0.0, 3.0]]) / 3, atol=1e-6)


def test_unreadable_layer_names_itself_and_the_override() -> None:
    model = TokenGapLinear(W)
    x = torch.rand(1, 2, 4, 4)  # 17 tokens: 1 + 4x4, but also 1x1 + 16 prefix, so no guess
    with pytest.raises(UsageError, match=r"layer 'feat' outputs shape \(1, 17, 2\).*--layout nchw\|nhwc\|tokens:P"):
        CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")])).check(x)
    with pytest.raises(UsageError, match=r"--layout tokens:4 does not fit layer 'feat'.*13 patch tokens"):
        CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")], layout="tokens:4")).check(x)
    ok = CamEngine(model, EngineConfig(["feat"], [get_method("gradcam")], layout={"feat": "tokens:1"}))
    ok.check(x)
    assert ok.maps(x, [ClassIndex(0)])[0].maps[0].cam.shape == (4, 4)
