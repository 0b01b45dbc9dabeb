"""Context managers that touch a model: freezing it and tapping a layer's output.

Both undo everything they did on exit, exceptions included.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

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


class LayerTap:
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
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "LayerTap":
        try:
            for name in self.layers:
                module = self.model.get_submodule(name)
                self._handles.append(module.register_forward_hook(self._hook(name)))
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
        self.activations.clear()
        self.replace.clear()

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
