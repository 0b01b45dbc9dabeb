"""Layer names: trace output shapes, choose a default, resolve ``--layer`` with suggestions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from camcli.errors import UsageError, suggest


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    shape: tuple[int, ...] | None  # output shape for a batch of one, None when not a tensor / not run
    finished: int  # order in which its forward finished (-1: not called)

    @property
    def spatial(self) -> bool:
        return self.shape is not None and len(self.shape) == 4 and (self.shape[2] > 1 or self.shape[3] > 1)


def trace_layers(model: nn.Module, example: Tensor) -> list[LayerInfo]:
    """Every named module with its output shape on ``example``, in module-tree order."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    order: dict[str, int] = {}
    counter = [0]
    handles = []

    def make(name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: object, out: object) -> None:
            shapes[name] = tuple(out.shape) if isinstance(out, Tensor) else None
            order[name] = counter[0]
            counter[0] += 1

        return hook

    try:
        for name, mod in model.named_modules():
            if name:
                handles.append(mod.register_forward_hook(make(name)))
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return [
        LayerInfo(name, type(mod).__name__, shapes.get(name), order.get(name, -1))
        for name, mod in model.named_modules()
        if name
    ]


def default_layer(infos: list[LayerInfo], score_channels: int | None = None) -> str:
    """The last layer (by when its forward finished) whose output is a spatial (B, C, h, w) map.

    ``score_channels``: a segmentation model's class count; layers with that many channels are its
    score maps, not features, and are passed over when a feature layer exists.
    """
    spatial = [i for i in infos if i.spatial and i.finished >= 0]
    if score_channels is not None:
        features = [i for i in spatial if i.shape is not None and i.shape[1] != score_channels]
        spatial = features or spatial
    if not spatial:
        raise UsageError("no layer of this model outputs a spatial (B, C, h, w) map; pass --layer")
    return max(spatial, key=lambda i: i.finished).name


def resolve_layers(model: nn.Module, spec: str | list[str], model_name: str) -> list[str]:
    """``"layer4"`` or ``"layer3,layer4"`` -> checked dotted names (``blocks.6.0`` style)."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    names = [p.strip() for part in parts for p in str(part).split(",") if p.strip()]
    known = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for n in names:
        dotted = n.replace("[", ".").replace("]", "")
        if dotted not in known:
            raise UsageError(
                f"unknown layer {n!r}{suggest(dotted, known) or ';'} see `camcli layers --model {model_name}`"
            )
        if dotted not in out:
            out.append(dotted)
    if not out:
        raise UsageError(f"--layer is empty; see `camcli layers --model {model_name}`")
    return out


def choose_layers(
    model: nn.Module, spec: str | list[str] | None, model_name: str, example: Tensor, score_channels: int | None = None
) -> list[str]:
    """``--layer`` resolved, or the default layer traced on ``example`` when none was given."""
    if spec:
        return resolve_layers(model, spec, model_name)
    return [default_layer(trace_layers(model, example), score_channels)]
