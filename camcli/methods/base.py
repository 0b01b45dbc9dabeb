"""The method registry: every CAM method is a function registered by name with its metadata."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

from camcli.errors import UsageError, suggest


class Scorer(Protocol):
    """Runs the model on N (masked) copies of batch image ``image_index``; returns that image's
    target scores (N,)."""

    def __call__(self, inputs: Tensor, image_index: int) -> Tensor: ...


class LayerScorer(Protocol):
    """Runs the model on one image with the target layer's output replaced by ``activations``
    (N, K, h, w) and returns that image's target scores (N,)."""

    def __call__(self, image_index: int, activations: Tensor) -> Tensor: ...


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
    finer_base: str = "gradcam"  # finercam: the method whose target becomes the contrast
    finer_alpha: float = 0.6  # finercam: weight of the reference classes' mean score
    finer_references: int = 3  # finercam: how many of the most similar classes


@dataclass
class CamInputs:
    """What the engine hands a method for one batch, one layer and one target per image.

    A method returns (B, h, w) maps, or (B, K, h, w) weighted activations that the engine reduces.
    """

    activations: Tensor  # A: (B, K, h, w)
    targets: Tensor  # c: (B,) class index per image (labels, classifier rows; scores come from the target)
    gradients: Tensor | None = None  # G = d y^c / d A: (B, K, h, w)
    inputs: Tensor | None = None  # the preprocessed batch (B, 3, H, W)
    scorer: Scorer | None = None
    layer_scorer: LayerScorer | None = None
    classifier_weights: Tensor | None = None  # (num_classes, K) when the head is GAP -> linear
    gradient_fn: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None  # x' (a modified batch) -> (A, G)
    guided_gradients: Callable[[], Tensor] | None = None  # guided-backprop d y^c / d x: (B, 3, H, W)
    options: MethodOptions = field(default_factory=MethodOptions)
    # Second-order and whole-model capabilities (ShapleyCAM, FullGrad, attention methods):
    hvp: Callable[[Tensor], Tensor] | None = None  # v (B, K, h, w) -> H v, H = d2 y^c / dA2 (needs_hvp)
    model: nn.Module | None = None  # the model, in eval mode with frozen parameters
    score_fn: Callable[[Tensor], Tensor] | None = None  # x -> (B,) y^c, differentiable, hooks passive (needs_model)
    forward: Callable[[Tensor], Tensor] | None = None  # inputs -> model scores, as the engine runs it


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
    # Checks the method's options against the layer's activations (1, K, h, w), run once before
    # any work starts; raises UsageError.
    check_layer: Callable[["MethodOptions", Tensor], None] | None = None
    # (model, example input) -> None, or UsageError saying why the method cannot work on this model;
    # run once before any work (and by --method all to skip the method with that reason)
    check: Callable[[Any, Tensor], None] | None = None
    # The method explains another scalar than the target's: (target, logits, options) -> target.
    # The engine takes gradients and scores for that target instead (Finer-CAM's contrast).
    retarget: Callable[[Any, Tensor, "MethodOptions"], Any] | None = None
    # The method is a family: the options pick the concrete method (Finer-CAM's base method).
    derive: Callable[["MethodOptions"], "MethodInfo"] | None = None
    needs_hvp: bool = False  # Hessian-vector products of the target score at the layer
    needs_model: bool = False  # a differentiable target score of any input (score_fn)


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
        f"(accepted: {', '.join(sorted(_REGISTRY))}, or all; see `camcli methods`)"
    )


ALL = "all"


def parse_methods(spec: str | list[str]) -> list[MethodInfo]:
    """``"gradcam,layercam"`` or a list of such strings -> resolved, de-duplicated methods.

    ``all`` is every registered method; the session drops, with a reason, those that do not fit.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    names = [p.strip() for part in parts for p in str(part).split(",") if p.strip()]
    if not names:
        raise UsageError("no method given (accepted: " + ", ".join(sorted(_REGISTRY)) + ", or all)")
    if ALL in (n.lower() for n in names):
        return available_methods()
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


def rescaled(maps: Tensor) -> Tensor:
    """Each map (the last two dimensions) min-max rescaled to [0, 1]; a constant map becomes 0."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, 1.0), 0.0)


def noise_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``; methods draw their noise from it with :func:`draw_noise`."""
    return torch.Generator(device="cpu").manual_seed(seed)


def draw_noise(generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device | str) -> Tensor:
    """Standard normal noise, one tensor of ``shape`` per generator -> (len(generators), *shape) on ``device``.

    Drawn on the CPU, then moved: CPU and CUDA generators give different streams for the same seed,
    so drawing on the device would make the same seed give a different map on every kind of device.
    """
    for g in generators:
        if g.device.type != "cpu":
            raise ValueError(f"noise is drawn from CPU generators, not {g.device} (see noise_generator)")
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


def require(value: Tensor | None, what: str, method: str) -> Tensor:
    if value is None:
        raise RuntimeError(f"engine bug: method {method!r} needs {what} but none was given")
    return value
