"""FullGrad: the full-gradient decomposition of the target score, shown in pixel space.

y^c = grad_x y^c . x + sum over biased layers of (b . grad_z y^c), z a layer's output. Each term is
rectified, rescaled per channel, upsampled to the input and summed. Every biased layer of the model
takes part, so the map does not depend on the chosen layer.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camcli.hooks import Hooks
from camcli.methods.base import CamInputs, register, rescaled

CHANNELS_FIRST = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)  # outputs (B, C, h, w)
CHANNELS_LAST = (nn.Linear,)  # a linear layer's output is spatial only as (B, h, w, C), as in ConvNeXt


def effective_bias(module: nn.Module) -> Tensor | None:
    """The constant a layer adds to each output channel, or None.

    For BatchNorm in eval mode: beta - running_mean * gamma / sqrt(running_var + eps), the bias of
    the affine map it is (the paper's code does the same).
    """
    if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None and module.running_var is not None:
        scale = module.running_var.add(module.eps).rsqrt()
        if module.weight is not None:
            scale = scale * module.weight
        bias = -module.running_mean * scale
        return bias if module.bias is None else bias + module.bias
    if isinstance(module, CHANNELS_FIRST + CHANNELS_LAST) and isinstance(getattr(module, "bias", None), Tensor):
        return module.bias
    return None


class OutputRecorder(Hooks):
    """Forward hooks that keep each call's output, graph included, in call order.

    Downstream layers get a clone, so an in-place op after the module (``ReLU(inplace=True)`` after a
    BatchNorm) leaves the recorded output, and the gradient taken at it, untouched.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self.outputs: list[tuple[int, Tensor]] = []  # (index into modules, output)
        super().__init__()

    def _register(self) -> None:
        for i, module in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._hook(i)))

    def _hook(self, i: int) -> Callable[[nn.Module, object, object], Tensor | None]:
        def hook(module: nn.Module, args: object, out: object) -> Tensor | None:
            if not isinstance(out, Tensor) or not out.requires_grad:
                return None  # not on a path from the input: no gradient to take
            self.outputs.append((i, out))
            return out.clone()

        return hook


def bias_term(module: nn.Module, bias: Tensor, grad: Tensor) -> Tensor | None:
    """|b * dy/dz| of one layer call, rescaled per channel (the paper's psi) and summed over channels
    -> (B, h, w); None when the output has no spatial grid (a classifier head's linear layer)."""
    if grad.dim() != 4:
        return None
    if isinstance(module, CHANNELS_LAST):
        grad = grad.permute(0, 3, 1, 2)
    return rescaled((bias.to(grad.dtype)[None, :, None, None] * grad).abs()).sum(dim=1)


@register(
    "fullgrad",
    aliases=("full-grad",),
    needs_model=True,
    pixel_space=True,
    extra_forwards="1 (+ full backward)",
    description="|input gradient x input| + |bias x gradient| of every conv/BN/linear layer, each rescaled "
    "per channel, upsampled and summed; uses the whole model, not the chosen layer",
    paper="Srinivas & Fleuret 2019, Full-Gradient Representation for Neural Network Visualization (arXiv:1905.00780)",
)
def fullgrad(inputs: CamInputs) -> Tensor:
    """One forward and ONE backward: a single autograd.grad over the input and every biased layer's output.

    Post-processing follows pytorch-grad-cam's FullGrad (the paper's Eq. 6): each term is |.|-rectified
    and rescaled to [0, 1] per channel (colour channels of the input term included) before the sum. The
    paper's own code rescales each layer's tensor as a whole instead. Bias gradients without a spatial
    grid (a classifier head) are left out, as in the paper's code: rescaled per channel they are 0.
    """
    model = inputs.model
    score_fn = inputs.score_fn
    x = inputs.inputs
    biased = [(m, b.detach()) for m in model.modules() if (b := effective_bias(m)) is not None]
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), OutputRecorder([m for m, _ in biased]) as recorder:
        score = score_fn(xg).sum()
        calls = list(recorder.outputs)
    grads = torch.autograd.grad(score, [xg, *(out for _, out in calls)], allow_unused=True)
    size = x.shape[-2:]
    total = rescaled((grads[0] * x).abs().float()).sum(dim=1)
    for (i, _), grad in zip(calls, grads[1:]):
        term = None if grad is None else bias_term(biased[i][0], biased[i][1], grad.float())
        if term is not None:
            total = total + F.interpolate(term[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return total
