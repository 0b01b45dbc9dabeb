"""Context managers that touch a model: freezing it and tapping a layer's output.

Both undo everything they did on exit, exceptions included. Also the guided-backprop mode
(GuidedReLUMode) that swaps ReLU-like functions for gated ones while it is entered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from camcli.errors import UsageError


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside; training mode and flags restored after."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags.items():
            p.requires_grad_(flag)


class Hooks(ABC):
    """Owns hook handles; removes them all on close, on exit and when registering fails midway."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @abstractmethod
    def _register(self) -> None:
        """Register the hooks, appending their handles to ``self._handles``."""

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        try:
            self._register()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class LayerTap(Hooks):
    """Forward hooks on named layers that record their outputs.

    With gradients enabled, the first tapped output in the graph becomes a leaf that requires grad,
    so ``torch.autograd.grad(score, tap.activations[...])`` reaches it without computing anything
    below the layer. Downstream code receives a clone, so in-place ops after the layer (an inplace
    ReLU) neither fail on the leaf nor alter the recorded activation.

    ``replace`` lets a caller substitute a layer's output (ablation); ``enabled = False`` makes the
    hooks pass outputs through untouched (perturbation forwards that need no recording).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.model = model
        self.layers = list(layers)
        self.activations: dict[str, Tensor] = {}
        self.replace: dict[str, Tensor] = {}
        self.enabled = True
        super().__init__()

    def _register(self) -> None:
        for name in self.layers:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def close(self) -> None:
        super().close()
        self.activations.clear()
        self.replace.clear()

    @contextmanager
    def paused(self, replace: dict[str, Tensor] | None = None) -> Iterator[None]:
        """The one way hooks are turned off: outputs pass through unrecorded inside the block, and
        the layers in ``replace`` output the given tensors instead. Restored on every path."""
        subs = dict(replace or {})
        self.enabled = False
        self.replace.update(subs)
        try:
            yield
        finally:
            for k in subs:
                self.replace.pop(k, None)
            self.enabled = True

    def _hook(self, name: str):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.Module, args: object, out: object) -> Tensor | None:
            if name in self.replace:
                return self.replace[name]
            if not self.enabled:
                return None
            if not isinstance(out, Tensor):
                raise UsageError(
                    f"layer {name!r} returns {type(out).__name__}, not a tensor; "
                    "choose a layer whose output is a (B, C, h, w) feature map (see `camcli layers`)"
                )
            if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
                leaf = out if out.requires_grad else out.detach().requires_grad_(True)
                self.activations[name] = leaf
                return leaf.clone()
            self.activations[name] = out.clone()
            return None

        return hook


BOUNDED = (nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid)  # nn.ReLU6 is a Hardtanh


def saturated(module: nn.Module, out: Tensor) -> Tensor:
    """Units within 1% of a bound where the gradient vanishes: |a| > 0.99 of the bound."""
    if isinstance(module, nn.Tanh):
        return out.abs() > 0.99
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return (out > 0.99) | (out < 0.01)
    assert isinstance(module, nn.Hardtanh)
    sat = torch.zeros_like(out, dtype=torch.bool)
    if module.max_val > 0:
        sat |= out > 0.99 * module.max_val
    if module.min_val < 0:
        sat |= out < 0.99 * module.min_val
    return sat


class SaturationMeter(Hooks):
    """Counts saturated units of bounded activation modules at or after the target layers.

    "At or after" means: run once the first target layer has started its forward (its own
    sub-modules included). Bounded functions called through torch.nn.functional are not seen.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.model = model
        self.layers = list(layers)
        self.started = False
        self.saturated: Tensor | None = None  # (B,) counts
        self.units: Tensor | None = None
        self.modules: list[str] = []
        super().__init__()

    @property
    def active(self) -> bool:
        return any(isinstance(m, BOUNDED) for m in self.model.modules())

    def _register(self) -> None:
        if not self.active:
            return
        for name in self.layers:
            self._handles.append(self.model.get_submodule(name).register_forward_pre_hook(self._start))
        for name, mod in self.model.named_modules():
            if isinstance(mod, BOUNDED):
                self._handles.append(mod.register_forward_hook(self._count(name)))

    def _start(self, module: nn.Module, args: object) -> None:
        self.started = True

    def _count(self, name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: object, out: object) -> None:
            if not self.started or not isinstance(out, Tensor) or out.dim() < 2:
                return
            with torch.no_grad():
                sat = saturated(module, out.detach()).flatten(1).sum(dim=1)
            n = torch.full_like(sat, out[0].numel())
            self.saturated = sat if self.saturated is None else self.saturated + sat
            self.units = n if self.units is None else self.units + n
            if name not in self.modules:
                self.modules.append(name)

        return hook


# -- guided backpropagation: a mode, not a hook, so in-place and functional ReLUs are covered too --

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
