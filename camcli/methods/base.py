"""The method registry: every CAM method is a function registered by name with its metadata."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from torch import Tensor

from camcli.errors import UsageError, suggest


class Scorer(Protocol):
    """Runs the model on a batch of (masked) inputs of one image and returns the target's scores."""

    def __call__(self, inputs: Tensor, target: int) -> Tensor: ...


class LayerScorer(Protocol):
    """Runs the model on one image with the target layer's output replaced by ``activations``
    (N, K, h, w) and returns the target's scores (N,)."""

    def __call__(self, image_index: int, activations: Tensor, target: int) -> Tensor: ...


@dataclass(frozen=True)
class MethodOptions:
    """Knobs some methods read; the engine passes the same object to every method."""

    score_channels: int | None = None  # Score-CAM family: only the N channels with most mass
    perturbation_batch: int = 16  # masked forward passes per model call (16 is fastest on CPU here)
    channels: str = "mean"  # `activations`: "mean", a channel index, or "topN"
    smooth_samples: int = 8  # SS-CAM / SmoothGrad-CAM++ noise samples
    smooth_sigma: float = 0.1  # noise std as a share of the input (or activation) range
    integration_steps: int = 8  # IS-CAM
    seed: int = 0
    progress: bool = False  # a progress bar (stderr, terminals only) for long perturbation loops


@dataclass
class CamInputs:
    """What the engine hands a method for one batch, one layer and one target per image.

    A method returns (B, h, w) maps, or (B, K, h, w) weighted activations that the engine reduces.
    """

    activations: Tensor  # A: (B, K, h, w)
    targets: Tensor  # c: (B,) class index per image
    gradients: Tensor | None = None  # G = d y^c / d A: (B, K, h, w)
    inputs: Tensor | None = None  # the preprocessed batch (B, 3, H, W)
    scorer: Scorer | None = None
    layer_scorer: LayerScorer | None = None
    classifier_weights: Tensor | None = None  # (num_classes, K) when the head is GAP -> linear
    gradient_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None  # (x, targets) -> (A, G)
    guided_gradients: Callable[[], Tensor] | None = None  # guided-backprop d y^c / d x: (B, 3, H, W)
    options: MethodOptions = field(default_factory=MethodOptions)
    model: Any = None  # the nn.Module, for methods that read inside the model (attention maps)
    forward: Callable[[Tensor], Tensor] | None = None  # inputs -> (B, classes) logits, as the engine runs it


MethodFn = Callable[[CamInputs], "Tensor | MethodOutput"]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: MethodFn
    description: str
    paper: str
    aliases: tuple[str, ...] = ()
    needs_gradients: bool = False
    extra_forwards: str = "0"  # per image, in words: "0", "K", "K x N"
    needs_target: bool = True
    needs_scorer: bool = False
    needs_layer_scorer: bool = False
    needs_classifier: bool = False
    needs_gradient_fn: bool = False
    pixel_space: bool = False  # map at input resolution, computed outside the layer hooks
    # (model, example input) -> None, or UsageError saying why the method cannot work on this model;
    # the engine calls it once, before any work
    check: Callable[[Any, Tensor], None] | None = None


_REGISTRY: dict[str, MethodInfo] = {}
_ALIASES: dict[str, str] = {}


def register(
    name: str,
    *,
    description: str,
    paper: str,
    aliases: tuple[str, ...] = (),
    **meta: Any,  # the other MethodInfo fields: needs_gradients, extra_forwards, needs_target, ...
) -> Callable[[MethodFn], MethodFn]:
    """Decorator: ``@register("gradcam++", aliases=("gradcampp",), needs_gradients=True, ...)``."""

    def deco(fn: MethodFn) -> MethodFn:
        for key in (name, *aliases):
            if key in _REGISTRY or key in _ALIASES:
                raise ValueError(f"method name {key!r} is registered twice")
        _REGISTRY[name] = MethodInfo(name=name, fn=fn, description=description, paper=paper, aliases=aliases, **meta)
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return deco


def available_methods() -> list[MethodInfo]:
    """All registered methods, in registration order."""
    return list(_REGISTRY.values())


def get_method(name: str) -> MethodInfo:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    names = sorted([*_REGISTRY, *_ALIASES])
    raise UsageError(
        f"unknown method {name!r}{suggest(key, names)} "
        f"(accepted: {', '.join(sorted(_REGISTRY))}; see `camcli methods`)"
    )


def parse_methods(spec: str | list[str]) -> list[MethodInfo]:
    """``"gradcam,layercam"`` or a list of such strings -> resolved, de-duplicated methods."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    names = [p.strip() for part in parts for p in str(part).split(",") if p.strip()]
    if not names:
        raise UsageError("no method given (accepted: " + ", ".join(sorted(_REGISTRY)) + ")")
    seen: dict[str, MethodInfo] = {}
    for n in names:
        info = get_method(n)
        seen.setdefault(info.name, info)
    return list(seen.values())


def chunks(n: int, size: int, desc: str, show: bool) -> Iterator[int]:
    """Start offsets 0, size, 2*size, ... < n; with ``show``, a transient tqdm bar on a terminal."""
    starts = range(0, n, size)
    if not show or len(starts) < 4 or not sys.stderr.isatty():
        return iter(starts)
    from tqdm import tqdm

    return iter(tqdm(starts, desc=desc, unit="batch", leave=False, file=sys.stderr))


def weigh(weights: Tensor, activations: Tensor) -> Tensor:
    """w_k A_k for weights (B, K) and activations (B, K, h, w) -> (B, K, h, w).

    Methods return these weighted activations; the engine sums them over channels (or, with
    --eigen-smooth, takes their first principal component), the same way for every method.
    """
    return weights[:, :, None, None] * activations


@dataclass
class MethodOutput:
    """A map plus per-channel extras (the `activations` method's strongest channels)."""

    cam: Tensor  # (B, h, w) or (B, K, h, w) weighted activations
    channels: Tensor | None = None  # (B, N, h, w)
    channel_ids: Tensor | None = None  # (B, N)


def require(value: Tensor | None, what: str, method: str) -> Tensor:
    if value is None:
        raise RuntimeError(f"engine bug: method {method!r} needs {what} but none was given")
    return value
