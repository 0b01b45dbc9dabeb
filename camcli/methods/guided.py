"""Pixel-space methods: Guided Backpropagation and Guided Grad-CAM.

Guided backprop changes how ReLU-like functions pass gradients back: only where the input was
positive (inside the clamp range) *and* the incoming gradient is positive. A TorchFunctionMode
swaps the functions themselves, so in-place ReLUs, ``nn.ReLU``/``nn.ReLU6`` modules and direct
``torch.nn.functional.relu`` calls inside ``forward`` are all covered.

A model without any ReLU-like function (a GELU transformer) would get a plain input gradient under
the guided name: the mode notices and refuses, naming the activations it found.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from camcli.errors import UsageError
from camcli.methods.base import CamInputs, register, require
from camcli.methods.gradient import gradcam


class _GuidedClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, lo: float, hi: float | None) -> Tensor:  # noqa: ANN401
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(min=lo) if hi is None else x.clamp(min=lo, max=hi)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN401
        (x,) = ctx.saved_tensors
        gate = (x > ctx.lo) & (grad > 0)
        if ctx.hi is not None:
            gate &= x < ctx.hi
        return grad * gate, None, None


_aten = torch.ops.aten
# Python-level functions (eager models) and the aten ops that torch.export graphs call directly.
_RELU = {F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, _aten.relu.default, _aten.relu_.default}
_HARDTANH = {F.hardtanh, F.hardtanh_, _aten.hardtanh.default, _aten.hardtanh_.default}
# Smooth or leaky rectifiers guided backprop has no gate for (matched by name: Python and aten forms).
_UNGATED = {"gelu", "silu", "mish", "hardswish", "elu", "selu", "celu", "leaky_relu", "softplus"}


def _base_name(func: object) -> str:
    name = getattr(func, "__name__", "")
    return name.split(".")[0].rstrip("_")


class GuidedReLUMode(TorchFunctionMode):
    """Inside this mode, relu / relu6 / hardtanh use guided-backprop gradients.

    On a clean exit it raises UsageError when the model ran not a single activation it can gate
    (none at all, or only GELU, SiLU, tanh, ...): that result would not be guided backprop at all.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gated = 0
        self.ungated: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in _RELU:
            self.gated += 1
            return _GuidedClamp.apply(args[0], 0.0, None)
        if func is F.relu6:
            self.gated += 1
            return _GuidedClamp.apply(args[0], 0.0, 6.0)
        if func in _HARDTANH:
            self.gated += 1
            lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
            hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
            return _GuidedClamp.apply(args[0], float(lo), float(hi))
        name = _base_name(func)
        if name in _UNGATED:
            self.ungated.add(name)
        return func(*args, **kwargs)

    def __exit__(self, exc_type, exc, tb):  # noqa: ANN001, ANN204
        out = super().__exit__(exc_type, exc, tb)
        if exc_type is None and self.gated == 0:
            uses = f": it uses {', '.join(sorted(self.ungated))}" if self.ungated else ""
            raise UsageError(
                f"guided backpropagation needs ReLU activations to gate, and this model has none{uses}, so the "
                "result would be a plain input gradient. Use a CAM method (gradcam, layercam, ...) on this model"
            )
        return out


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
    return saliency(require(inputs.guided_gradients, "guided gradients", "guided-backprop")())


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
    grad = require(inputs.guided_gradients, "guided gradients", "guided-gradcam")()
    coarse = torch.relu(gradcam(inputs).sum(dim=1))
    up = F.interpolate(coarse[:, None], size=grad.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = up.flatten(1).amax(dim=1).clamp(min=1e-12)
    return saliency(grad) * (up / peak[:, None, None])
