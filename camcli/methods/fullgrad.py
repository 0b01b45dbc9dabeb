"""FullGrad: the full-gradient decomposition of the target score, shown in pixel space.

y^c = grad_x y^c . x + sum over biased layers of (b . grad_z y^c), z a layer's affine output (before
the activation of a BatchNorm fused with one). Exact for networks piecewise linear and homogeneous in
x and the biases together (``FullGradients.total``); smooth non-linearities, LayerNorm, softmax and
ReLU6's clipping add implicit biases that no layer holds. Each term is rectified, rescaled per
channel, upsampled to the input and summed. Every biased layer of the model takes part, so the map
does not depend on the chosen layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camcli.errors import UsageError
from camcli.hooks import Hooks
from camcli.layouts import Grid, ModelHints, detect, model_hints
from camcli.methods.base import CamInputs, register, rescaled

CHANNELS_FIRST = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)  # outputs (B, C, h, w)
CHANNELS_LAST = (nn.Linear,)  # a linear layer's output: (B, C), (B, h, w, C) as in ConvNeXt, or tokens (B, N, C)


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


def pre_activation(module: nn.Module) -> nn.Module | None:
    """For a BatchNorm fused with its activation (timm's and the bundled model's ``BatchNormAct2d``:
    act(drop(BN(x)))), the activation module, whose INPUT is the affine output z the bias is added
    to; None for a plain layer, whose own output is z.

    The bias gradient must be taken at z: at the activation's output (ReLU6(z), SiLU(z)) it misses
    the activation's derivative. A BatchNorm subclass that changes ``forward`` in any other way is
    refused by name (``biased_layers``) rather than measured at the wrong place.
    """
    act = getattr(module, "act", None)
    return act if isinstance(module, nn.BatchNorm2d) and isinstance(act, nn.Module) else None


def _plain_forward(module: nn.Module) -> bool:
    return not isinstance(module, nn.BatchNorm2d) or type(module).forward is nn.BatchNorm2d.forward


def biased_layers(model: nn.Module) -> list[tuple[str, nn.Module, Tensor, nn.Module | None]]:
    """(name, layer, effective bias, activation whose input is the layer's affine output or None), for
    every conv, BatchNorm and linear layer with a bias; UsageError naming a layer whose affine output
    camcli cannot reach."""
    found = []
    for name, module in model.named_modules():
        bias = effective_bias(module)
        if bias is None:
            continue
        act = pre_activation(module)
        if act is None and not _plain_forward(module):
            raise UsageError(
                f"fullgrad: layer {name!r} ({type(module).__name__}) is a BatchNorm with its own forward and no "
                "`act` submodule, so its bias gradient cannot be taken before whatever follows the normalisation; "
                "fullgrad accepts plain BatchNorm2d and BatchNorm + activation layers (timm's BatchNormAct2d)"
            )
        found.append((name, module, bias.detach(), act))
    return found


class OutputRecorder(Hooks):
    """Hooks that keep each call's affine output z, graph included, in call order: the output of a
    plain layer (forward hook), the input of a fused BatchNorm's activation (forward pre-hook).

    Downstream layers get a clone, so an in-place op after the module (``ReLU(inplace=True)`` after a
    BatchNorm, ``ReLU6(inplace=True)`` inside BatchNormAct2d) leaves the recorded tensor, and the
    gradient taken at it, untouched.
    """

    def __init__(self, modules: Sequence[nn.Module], acts: Sequence[nn.Module | None] | None = None) -> None:
        self.modules = list(modules)
        self.acts = list(acts) if acts is not None else [None] * len(self.modules)
        self.outputs: list[tuple[int, Tensor]] = []  # (index into modules, output)
        super().__init__()

    def _register(self) -> None:
        for i, (module, act) in enumerate(zip(self.modules, self.acts)):
            if act is None:
                self._handles.append(module.register_forward_hook(self._hook(i)))
            else:
                self._handles.append(act.register_forward_pre_hook(self._pre_hook(i)))

    def _keep(self, i: int, out: object) -> Tensor | None:
        if not isinstance(out, Tensor) or not out.requires_grad:
            return None  # not on a path from the input: no gradient to take
        self.outputs.append((i, out))
        return out.clone()

    def _hook(self, i: int) -> Callable[[nn.Module, object, object], Tensor | None]:
        def hook(module: nn.Module, args: object, out: object) -> Tensor | None:
            return self._keep(i, out)

        return hook

    def _pre_hook(self, i: int) -> Callable[[nn.Module, tuple], tuple | None]:
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            kept = self._keep(i, args[0]) if args else None
            return None if kept is None else (kept, *args[1:])

        return hook


def channel_axis(module: nn.Module, grad: Tensor) -> int:
    """The axis of a layer's output that its bias runs along: 1 for conv/BatchNorm, the last for linear."""
    return grad.dim() - 1 if isinstance(module, CHANNELS_LAST) else 1


def bias_contribution(module: nn.Module, bias: Tensor, grad: Tensor) -> Tensor:
    """b . dy/dz of one layer call, summed over everything but the batch -> (B,): the layer's share
    of the target score in the full-gradient decomposition."""
    axis = channel_axis(module, grad)
    shape = [1] * grad.dim()
    shape[axis] = -1
    return (bias.to(grad.dtype).view(shape) * grad).flatten(1).sum(dim=1)


@dataclass
class FullGradients:
    """The full-gradient decomposition of a target score: y = x . dy/dx + sum_i b_i . dy/dz_i,
    exact for a network that is piecewise linear in its input and biases together."""

    inputs: Tensor  # x (B, 3, H, W)
    input_grad: Tensor  # dy/dx
    calls: list[tuple[str, nn.Module, Tensor, Tensor]]  # (layer name, layer, effective bias, dy/dz) per call

    def total(self) -> Tensor:
        """x . dy/dx + sum of the bias contributions -> (B,); equals y where the decomposition is exact."""
        out = (self.inputs * self.input_grad).flatten(1).sum(dim=1)
        for _, module, bias, grad in self.calls:
            out = out + bias_contribution(module, bias, grad)
        return out


def full_gradients(model: nn.Module, score_fn: Callable[[Tensor], Tensor], x: Tensor) -> FullGradients:
    """One forward and ONE backward: a single autograd.grad over the input and every biased layer's z."""
    biased = biased_layers(model)
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), OutputRecorder([m for _, m, _, _ in biased], [a for *_, a in biased]) as recorder:
        score = score_fn(xg).sum()
        calls = list(recorder.outputs)
    grads = torch.autograd.grad(score, [xg, *(out for _, out in calls)], allow_unused=True)
    kept = [
        (biased[i][0], biased[i][1], biased[i][2], grad)
        for (i, _), grad in zip(calls, grads[1:])
        if grad is not None
    ]
    return FullGradients(x.detach(), grads[0], kept)


def bias_term(name: str, module: nn.Module, bias: Tensor, grad: Tensor, hints: ModelHints, size: Grid) -> Tensor | None:
    """|b * dy/dz| of one layer call, rescaled per channel (the paper's psi) and summed over channels
    -> (B, h, w); None when the output has no spatial grid (a classifier head's (B, C) output: one
    value per channel, which the per-channel rescaling turns into 0).

    Token outputs (B, P + h*w, C) are placed on the patch grid by the model's layout; the P prefix
    tokens (class, registers) lie on no image position and are not drawn. A spatial output that no
    layout places is refused by name, never dropped.
    """
    if grad.dim() == 2:
        return None
    if grad.dim() == 4:
        nchw = grad.permute(0, 3, 1, 2) if isinstance(module, CHANNELS_LAST) else grad
    else:
        layout = detect(tuple(grad.shape), size, hints) if grad.dim() == 3 and isinstance(module, CHANNELS_LAST) else None
        if layout is None:
            raise UsageError(
                f"fullgrad: layer {name!r} ({type(module).__name__}) outputs shape {tuple(grad.shape)}, which camcli "
                f"cannot place on the {size[0]}x{size[1]} input, so its bias term would be lost; fullgrad accepts "
                "(B, C), (B, C, h, w), channels-last (B, h, w, C) and token (B, P + h*w, C) outputs"
            )
        nchw = layout.to_nchw(grad)
    return rescaled((bias.to(nchw.dtype)[None, :, None, None] * nchw).abs()).sum(dim=1)


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
    parts = full_gradients(model, score_fn, x)
    size = (int(x.shape[-2]), int(x.shape[-1]))
    hints = model_hints(model)
    total = rescaled((parts.input_grad * x).abs().float()).sum(dim=1)
    for name, module, bias, grad in parts.calls:
        term = bias_term(name, module, bias, grad.float(), hints, size)
        if term is not None:
            total = total + F.interpolate(term[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return total
