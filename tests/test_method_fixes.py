"""Issue 24: FullGrad's completeness on real architectures, the sanity check's baselines, the FEM of
the paper, attention rollout's discard ratio, the default layer of an average-pooled ViT, method
checks on the Python API, and KPCA-CAM on large layers. Each against a reference written from the
paper or against pytorch-grad-cam, with any deviation named."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from camcli.engine import CamEngine
from camcli.errors import UsageError
from camcli.methods import get_method
from camcli.methods.fullgrad import full_gradients
from camcli.targets import ClassIndex

# -- FullGrad: completeness ---------------------------------------------------------------------------
#
# Srinivas & Fleuret 2019, Eq. 2: for a network that is piecewise linear in its input x and its
# biases b together, f(x) = grad_x f . x + sum_i grad_{b_i} f . b_i, where grad_{b_i} f is the gradient
# at the layer's affine output z_i (before any activation). ReLU, ReLU6, max pooling, average pooling,
# zero padding, residual sums and eval-mode BatchNorm keep that exact. GELU, SiLU, LayerNorm and softmax
# attention do not (the paper's "implicit biases" of smooth non-linearities are no module's bias), so
# the ViT below is made piecewise linear in the test: ReLU MLPs, no norms, attention whose queries and
# keys are zero (uniform weights: a mean over tokens), no class token and a zero position embedding
# (additive parameters that are not a layer's bias). What it checks is that every conv and linear bias
# on the token path is counted; before issue 24 the token Linear layers' terms were dropped.
# Double precision, so 1e-4 is far above rounding.


def completeness_gap(model: nn.Module, x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = model.double().eval()
    x = x.double()
    with torch.no_grad():
        logits = model(x)[:, target]
    parts = full_gradients(model, lambda t: model(t)[:, target], x)
    return parts.total(), logits


def relu6_implicit_bias(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """sum over ReLU6 units clipped at 6 of 6 * dy/da -> (B,): ReLU6 is piecewise linear but not
    homogeneous; a clipped unit outputs the constant 6, a bias of no layer (the paper's implicit bias)."""
    outs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        outs.append(out)
        return out

    handles = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, nn.ReLU6)]
    try:
        y = model(x.double().requires_grad_(True))[:, target].sum()
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(y, outs)
    return sum(((o == 6).double() * 6 * g).flatten(1).sum(dim=1) for o, g in zip(outs, grads))


def test_fullgrad_completeness_on_the_bundled_model(bundled) -> None:  # noqa: ANN001
    # EfficientNet-Lite0 with its real weights: conv -> BatchNormAct2d (BN, then ReLU6 in place)
    # throughout. The bias gradient is taken at the BN's affine output, not at ReLU6's output; before
    # the fix the gap was -45 to -324 on logits of 5 to 11. ReLU6's clipping at 6 is a constant no
    # layer's bias holds: the identity adds it (computed here independently), and the map, as the
    # paper's code and pytorch-grad-cam, draws explicit biases only.
    model = copy.deepcopy(bundled.module).double().eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    total, logits = completeness_gap(model, x, 281)
    implicit = relu6_implicit_bias(model, x, 281)
    assert logits.abs().min() > 0.1 and implicit.abs().min() > 0.1  # both sides matter
    torch.testing.assert_close(total + implicit, logits, atol=1e-4, rtol=0)


def test_fullgrad_completeness_on_a_resnet() -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.3 * torch.randn(c, generator=gen))
    x = torch.randn(2, 3, 64, 64, generator=gen)
    total, logits = completeness_gap(model, x, 3)
    assert logits.abs().min() > 1e-3
    torch.testing.assert_close(total, logits, atol=1e-4, rtol=0)


def linear_vit() -> nn.Module:
    """A small timm ViT, random init, made piecewise linear (see the comment above)."""
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, class_token=False,
        global_pool="avg", act_layer=nn.ReLU, norm_layer=nn.Identity, pos_embed="learn",
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        model.pos_embed.zero_()
        for block in model.blocks:
            dim = block.attn.qkv.in_features
            block.attn.qkv.weight[: 2 * dim].zero_()  # queries and keys: 0 -> uniform attention
            block.attn.qkv.bias[: 2 * dim].zero_()
    return model


def test_fullgrad_completeness_on_a_vit() -> None:
    model = linear_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    total, logits = completeness_gap(model, x, 1)
    names = {name for name, *_ in full_gradients(model.double(), lambda t: model(t)[:, 1], x.double()).calls}
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "head"} <= names
    torch.testing.assert_close(total, logits, atol=1e-4, rtol=0)


def test_fullgrad_draws_token_bias_terms_on_the_patch_grid() -> None:
    # Reference written from the paper's Eq. 6 with plain hooks: psi(|x * dx|) + sum over conv and
    # linear layers with a spatial output of psi(|b * dz|), psi = min-max per channel then upsampled;
    # token outputs (B, h*w, C) (no class token here) read row by row onto the 4x4 patch grid.
    import torch.nn.functional as F

    from camcli.sanity import pearson

    model = linear_vit().float().eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))

    def psi(t: torch.Tensor) -> torch.Tensor:  # (1, C, h, w) -> (1, h, w)
        lo = t.amin(dim=(2, 3), keepdim=True)
        hi = t.amax(dim=(2, 3), keepdim=True)
        return ((t - lo) / (hi - lo).clamp_min(1e-12)).sum(dim=1)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    outs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda m, a, o: outs.append(o)) for m in layers]
    xg = x.clone().requires_grad_(True)
    score = model(xg)[0, 0]
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(score, [xg, *outs])
    ref = psi((xg * grads[0]).abs().detach())
    drawn = 0
    for m, g in zip(layers, grads[1:]):
        if g.dim() == 2:
            continue  # the head: no grid
        t = g.reshape(1, 4, 4, -1).permute(0, 3, 1, 2) if g.dim() == 3 else g
        term = psi((m.bias.detach()[None, :, None, None] * t).abs())
        ref = ref + F.interpolate(term[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
        drawn += 1
    assert drawn == 1 + 2 * 4  # patch embedding + (qkv, proj, fc1, fc2) per block
    ours = CamEngine(model, ["blocks.1"], [get_method("fullgrad")]).explain(x, [ClassIndex(0)])[0].maps[0].cam
    assert pearson(ours, ref[0].numpy()) > 0.9999


class OddNorm(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward adds something after the normalisation, with no `act`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x))


def test_fullgrad_refuses_a_bias_it_cannot_place_by_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), OddNorm(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with pytest.raises(UsageError, match=r"layer '1' \(OddNorm\)"):
        full_gradients(model, lambda t: model(t)[:, 0], torch.randn(1, 3, 8, 8))
