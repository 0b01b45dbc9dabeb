"""The method registry: every CAM method is a function registered by name with its metadata."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence, cast

import torch
from torch import Tensor, nn

from camcli.errors import UsageError, suggest
from camcli.options import names as option_names


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
    """Knobs some methods read, named as their flags; the engine passes the same object to every method."""

    score_channels: int | None = None  # Score-CAM family: only the N channels with most mass
    perturbation_batch: int = 16  # masked forward passes per model call (16 is fastest on CPU here)
    channels: str = "mean"  # `activations`: "mean", a channel index, or "topN"
    samples: int = 8  # --samples: SS-CAM / SmoothGrad-CAM++ noise samples; IS-CAM integration steps
    noise: float = 0.1  # --noise: noise std as a share of the input (or activation) range
    seed: int = 0
    progress: bool = False  # a progress bar (stderr, terminals only) for long perturbation loops
    finer_base: str = "gradcam"  # finercam: the method whose target becomes the contrast
    finer_alpha: float = 0.6  # finercam: weight of the reference classes' mean score
    finer_references: int = 3  # finercam: how many of the most similar classes
    discard_ratio: float = 0.0  # attention-rollout: share of the lowest head-mean attention entries set to 0
    occlusion_window: int = 16  # occlusion: patch side, in model-input pixels
    occlusion_stride: int = 8  # occlusion: step between patch positions
    occlusion_fill: float = 0.0  # occlusion: the patch's value in the normalised input (0: the dataset mean)
    rise_masks: int = 1000  # rise: number of random masks N
    rise_grid: int = 7  # rise: grid cells per side s
    rise_keep: float = 0.5  # rise: probability p that a cell is kept


class Lender(Protocol):
    """Builds a capability for one layer on first use (the engine's ``camcli.capabilities.ModelAccess``)."""

    def lend(self, what: str, layer: str) -> Any: ...  # noqa: ANN401


# What a method may read from its CamInputs -> the MethodInfo flag that declares it (None: every method).
NEEDS: dict[str, str | None] = {
    "gradients": "needs_gradients",
    "scorer": "needs_scorer",
    "layer_scorer": "needs_layer_scorer",
    "classifier_weights": "needs_classifier",
    "gradient_fn": "needs_gradient_fn",
    "guided_gradients": "pixel_space",
    "hvp": "needs_hvp",
    "score_fn": "needs_model",
    "inputs": None,
    "model": None,
    "forward": None,
}


class CamInputs:
    """The one context a method reads, for one batch, one layer and one target per image.

    A method declares what it needs once, in its ``@register(...)`` flags (``needs_scorer``, ...), and
    reads it here: whatever was not given is built on first use by the engine's lender and cached,
    so a method pays only for what it reads. Reading something the method did not declare is a bug
    in the method, reported as one. Values may also be given directly (tests call methods that way).

    A method returns (B, h, w) maps, or (B, K, h, w) weighted activations that the engine reduces.
    """

    def __init__(
        self,
        activations: Tensor,  # A: (B, K, h, w)
        targets: Tensor,  # c: (B,) class index per image (labels, classifier rows; scores come from the target)
        *,
        options: MethodOptions | None = None,
        method: MethodInfo | None = None,  # whose declaration is enforced (None: anything given may be read)
        layer: str = "",
        lender: Lender | None = None,
        **given: Any,  # noqa: ANN401 (any of NEEDS, e.g. gradients=G)
    ) -> None:
        unknown = sorted(set(given) - set(NEEDS))
        if unknown:
            raise TypeError(f"CamInputs got unknown capabilities {unknown} (accepted: {', '.join(NEEDS)})")
        self.activations = activations
        self.targets = targets
        self.options = MethodOptions() if options is None else options
        self._method = method
        self._layer = layer
        self._lender = lender
        self._have: dict[str, Any] = {k: v for k, v in given.items() if v is not None}

    def _get(self, what: str) -> Any:  # noqa: ANN401
        m = self._method
        flag = NEEDS[what]
        if m is not None and flag is not None and not getattr(m, flag):
            raise RuntimeError(f"method {m.name!r} reads {what} but does not declare {flag}=True in its register(...)")
        have = self._have.get(what)
        if have is None:
            if self._lender is None:
                name = "a method" if m is None else f"method {m.name!r}"
                raise RuntimeError(f"engine bug: {name} needs {what} but none was given")
            have = self._have[what] = self._lender.lend(what, self._layer)
        return have

    @property
    def gradients(self) -> Tensor:
        """G = d y^c / d A: (B, K, h, w), fp32 (needs_gradients)."""
        return cast(Tensor, self._get("gradients"))

    @property
    def inputs(self) -> Tensor:
        """The preprocessed batch (B, 3, H, W)."""
        return cast(Tensor, self._get("inputs"))

    @property
    def scorer(self) -> Scorer:
        """Target scores of modified copies of one image (needs_scorer)."""
        return cast(Scorer, self._get("scorer"))

    @property
    def layer_scorer(self) -> LayerScorer:
        """Target scores with this layer's output replaced (needs_layer_scorer)."""
        return cast(LayerScorer, self._get("layer_scorer"))

    @property
    def classifier_weights(self) -> Tensor:
        """(num_classes, K) when the head is GAP -> linear (needs_classifier)."""
        return cast(Tensor, self._get("classifier_weights"))

    @property
    def gradient_fn(self) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """x' (a modified batch) -> (A, G) at this layer (needs_gradient_fn)."""
        return cast(Callable[[Tensor], tuple[Tensor, Tensor]], self._get("gradient_fn"))

    @property
    def guided_gradients(self) -> Tensor:
        """Guided-backprop d y^c / d x: (B, 3, H, W) (pixel_space)."""
        return cast(Tensor, self._get("guided_gradients"))

    @property
    def hvp(self) -> Callable[[Tensor], Tensor]:
        """v (B, K, h, w) -> H v, H = d2 y^c / dA2 (needs_hvp)."""
        return cast(Callable[[Tensor], Tensor], self._get("hvp"))

    @property
    def model(self) -> nn.Module:
        """The model, in eval mode with frozen parameters."""
        return cast(nn.Module, self._get("model"))

    @property
    def score_fn(self) -> Callable[[Tensor], Tensor]:
        """x -> (B,) y^c, differentiable, layer taps passive (needs_model)."""
        return cast(Callable[[Tensor], Tensor], self._get("score_fn"))

    @property
    def forward(self) -> Callable[[Tensor], Tensor]:
        """inputs -> model scores, as the engine runs it (taps paused)."""
        return cast(Callable[[Tensor], Tensor], self._get("forward"))


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
    # MethodOptions fields the method reads whose options are unset by default (so runs of other
    # methods keep their fingerprints): a run of the method records their resolved values among the
    # facts that shape its outputs (Session.shaping), so they are in its fingerprint either way.
    reads: tuple[str, ...] = ()


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


def parse_methods(names: str | Sequence[str]) -> list[MethodInfo]:
    """Method names (``--method``'s items) -> resolved, de-duplicated methods. Python callers may
    give text as ``--method`` takes it ("gradcam,layercam"): it is read as the option reads it.

    ``all`` is every registered method; the session drops, with a reason, those that do not fit.
    """
    if isinstance(names, str):
        names = [n for n in option_names(names) if n]
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
