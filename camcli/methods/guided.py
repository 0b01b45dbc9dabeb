"""Pixel-space methods: Guided Backpropagation and Guided Grad-CAM.

Guided backprop changes how ReLU-like functions pass gradients back: only where the input was
positive (inside the clamp range) *and* the incoming gradient is positive. The mode that does it,
``camcli.hooks.GuidedReLUMode``, lives with the other hooks: the engine's ``ModelAccess`` enters it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camcli.hooks import GuidedReLUMode
from camcli.methods.base import CamInputs, register
from camcli.methods.gradient import gradcam


def check_gates(model: nn.Module, example: Tensor) -> None:
    """MethodInfo.check for the guided methods: one forward inside the mode (UsageError if it refuses)."""
    with torch.inference_mode(), GuidedReLUMode():
        model(example)


SALIENCY_CLIP = 0.995


def saliency(grad: Tensor) -> Tensor:
    """(B, 3, H, W) input gradient -> (B, H, W): the largest magnitude over colour channels.

    Input gradients are heavy-tailed: a handful of pixels would take the whole colour range, so each
    map is clipped at its 99.5th percentile before the usual normalisation.
    """
    s = grad.abs().amax(dim=1)
    cap = torch.quantile(s.flatten(1).float(), SALIENCY_CLIP, dim=1)
    return torch.minimum(s, cap[:, None, None].to(s.dtype))


@register(
    "guided-backprop",
    aliases=("guidedbackprop", "guided_backprop", "gbp"),
    pixel_space=True,
    check=check_gates,
    extra_forwards="1 (+ full backward)",
    description="input gradient through guided ReLUs; fine detail, weakly class-specific",
    paper="Springenberg et al. 2015, Striving for Simplicity (arXiv:1412.6806)",
)
def guided_backprop(inputs: CamInputs) -> Tensor:
    return saliency(inputs.guided_gradients)


@register(
    "guided-gradcam",
    aliases=("guidedgradcam", "guided_gradcam"),
    needs_gradients=True,
    pixel_space=True,
    check=check_gates,
    extra_forwards="1 (+ full backward)",
    description="guided backprop x upsampled Grad-CAM: fine detail, class-specific",
    paper="Selvaraju et al. 2017, Grad-CAM (arXiv:1610.02391)",
)
def guided_gradcam(inputs: CamInputs) -> Tensor:
    grad = inputs.guided_gradients
    coarse = torch.relu(gradcam(inputs).sum(dim=1))
    up = F.interpolate(coarse[:, None], size=grad.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = up.flatten(1).amax(dim=1).clamp(min=1e-12)
    return saliency(grad) * (up / peak[:, None, None])
