"""Layouts: how a layer's output lies on the input image, and the reshape to (B, C, h, w) and back.

Every CAM method works on (B, C, h, w) maps. A CNN layer already is one (NCHW); a Swin stage is
channels-last (NHWC); a ViT block outputs tokens (B, P + h*w, C): P prefix tokens (class, register,
distillation) followed by the patch grid in row-major order. A Layout turns such an output into
(B, C, h, w) (``to_nchw``) and back (``from_nchw``, for methods that replace a layer's output).

Layouts are found from the model itself (``model_hints`` reads timm, torchvision and Hugging Face
attributes), confirmed against the actual output shape and input size (``detect`` / ``Layout.bind``),
and can be forced with ``parse_layout("nchw" | "nhwc" | "tokens:P")`` (the ``--layout`` option).
"""

from __future__ import annotations

import math
import re
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from camcli.errors import UsageError

LAYOUT_CHOICES = "nchw, nhwc or tokens:P (P = number of prefix tokens, such as a class token, before the patch grid)"
MAX_PREFIX = 16  # prefix tokens tried when the model does not say how many it has


class LayoutError(ValueError):
    """A layout does not fit a tensor; the message says why (the caller adds the layer's name)."""


Grid = tuple[int, int]


@dataclass(frozen=True)
class Layout(ABC):
    """Base class. ``bind`` checks a shape and returns a layout with everything resolved."""

    @property
    @abstractmethod
    def spec(self) -> str:
        """The layout as ``--layout`` spells it."""

    @abstractmethod
    def bind(self, shape: Sequence[int], input_hw: Grid) -> Layout:
        """This layout resolved for a tensor of ``shape`` from an input of ``input_hw``; LayoutError if it does not fit."""

    @abstractmethod
    def grid_of(self, shape: Sequence[int]) -> Grid:
        """The (h, w) feature grid of a tensor of this shape."""

    @abstractmethod
    def to_nchw(self, t: Tensor) -> Tensor:
        """The tensor as (B, C, h, w)."""

    @abstractmethod
    def from_nchw(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        """Inverse of ``to_nchw``. ``like``: an original output that supplies what the (B, C, h, w)
        view dropped (prefix tokens); its batch is 1 or that of ``t``."""

    def describe(self, shape: Sequence[int]) -> str:
        h, w = self.grid_of(shape)
        return f"{self.spec} {h}x{w}"

    def __str__(self) -> str:
        return self.spec


def _need_dims(shape: Sequence[int], n: int, spec: str) -> None:
    if len(shape) != n:
        raise LayoutError(f"layout {spec} needs a {n}-D output, got shape {tuple(shape)}")


@dataclass(frozen=True)
class NCHW(Layout):
    """(B, C, h, w): convolutional feature maps. The identity."""

    @property
    def spec(self) -> str:
        return "nchw"

    def bind(self, shape: Sequence[int], input_hw: Grid) -> Layout:
        _need_dims(shape, 4, self.spec)
        return self

    def grid_of(self, shape: Sequence[int]) -> Grid:
        return int(shape[2]), int(shape[3])

    def to_nchw(self, t: Tensor) -> Tensor:
        return t

    def from_nchw(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        return t


@dataclass(frozen=True)
class NHWC(Layout):
    """(B, h, w, C): channels last (Swin stages, ConvNeXt block internals, timm ``output_fmt='NHWC'``)."""

    @property
    def spec(self) -> str:
        return "nhwc"

    def bind(self, shape: Sequence[int], input_hw: Grid) -> Layout:
        _need_dims(shape, 4, self.spec)
        return self

    def grid_of(self, shape: Sequence[int]) -> Grid:
        return int(shape[1]), int(shape[2])

    def to_nchw(self, t: Tensor) -> Tensor:
        return t.permute(0, 3, 1, 2).contiguous()

    def from_nchw(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        return t.permute(0, 2, 3, 1).contiguous()


@dataclass(frozen=True)
class Tokens(Layout):
    """(B, prefix + gh*gw, C): ``prefix`` tokens first, then the patch grid row by row.

    ``grid`` None: found at bind time, from ``patch`` (grid = input / patch, rounded down or up) or
    else from the token count and the input's aspect ratio.
    """

    prefix: int = 0
    grid: Grid | None = None
    patch: Grid | None = None

    def __post_init__(self) -> None:
        if self.prefix < 0:
            raise ValueError(f"prefix must be >= 0, got {self.prefix}")

    @property
    def spec(self) -> str:
        return f"tokens:{self.prefix}"

    def bind(self, shape: Sequence[int], input_hw: Grid) -> Layout:
        _need_dims(shape, 3, self.spec)
        n = int(shape[1]) - self.prefix
        if n < 1:
            raise LayoutError(f"{shape[1]} tokens leave no patch grid after {self.prefix} prefix tokens")
        if self.grid is not None:
            if self.grid[0] * self.grid[1] != n:
                raise LayoutError(
                    f"{n} patch tokens do not fill the {self.grid[0]}x{self.grid[1]} grid "
                    f"({self.grid[0] * self.grid[1]} tokens)"
                )
            return self
        grid = patch_grid(n, input_hw, self.patch) or infer_grid(n, input_hw)
        if grid is None:
            raise LayoutError(
                f"{n} patch tokens (after {self.prefix} prefix tokens) form no grid with the "
                f"{input_hw[0]}x{input_hw[1]} input's aspect ratio"
            )
        return Tokens(self.prefix, grid, self.patch)

    def grid_of(self, shape: Sequence[int]) -> Grid:
        if self.grid is not None:
            return self.grid
        n = int(shape[1]) - self.prefix
        side = math.isqrt(max(n, 0))
        if side * side != n or n == 0:
            raise LayoutError(f"{n} patch tokens form no square grid; bind the layout to the input size first")
        return side, side

    def to_nchw(self, t: Tensor) -> Tensor:
        gh, gw = self.grid_of(t.shape)
        b, _, c = t.shape
        return t[:, self.prefix :].reshape(b, gh, gw, c).permute(0, 3, 1, 2).contiguous()

    def from_nchw(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        b, c, gh, gw = t.shape
        patches = t.permute(0, 2, 3, 1).reshape(b, gh * gw, c)
        if self.prefix == 0:
            return patches
        if like is None:
            raise ValueError(f"layout {self.spec} needs the original output to restore its {self.prefix} prefix tokens")
        prefix = like[:, : self.prefix].to(patches.dtype)
        if prefix.shape[0] != b:
            prefix = prefix.expand(b, -1, -1)
        return torch.cat([prefix, patches], dim=1)


def parse_layout(spec: str) -> Layout:
    """``nchw`` | ``nhwc`` | ``tokens:P`` -> a Layout; UsageError naming the bad value otherwise."""
    s = str(spec).strip().lower()
    if s == "nchw":
        return NCHW()
    if s == "nhwc":
        return NHWC()
    m = re.fullmatch(r"tokens:(\d+)", s)
    if m:
        return Tokens(prefix=int(m.group(1)))
    hint = ""
    if s.startswith("tokens"):
        hint = " (say how many prefix tokens come before the patch grid: tokens:0 for none, tokens:1 for a class token)"
    raise UsageError(f"--layout {spec!r} is not a layout{hint}; accepted: {LAYOUT_CHOICES}")


def as_layout(value: Layout | str | None) -> Layout | None:
    if value is None or isinstance(value, Layout):
        return value
    return parse_layout(value)


# -- grids -----------------------------------------------------------------------------------------
def fits(grid: Grid, input_hw: Grid, strict: bool = False) -> bool:
    """Whether an (h, w) grid covers an (H, W) input with one stride for both axes.

    Loose: within one cell of H/s and W/s (padding and rounding in small maps). Strict: one integer
    stride divides both sides exactly, (H, W) = (h s, w s).
    """
    (h, w), (hh, ww) = grid, input_hw
    if h < 1 or w < 1 or h > hh or w > ww:
        return False
    if strict:
        return hh % h == 0 and ww % w == 0 and hh // h == ww // w
    return any(abs(hh / s - h) <= 1 and abs(ww / s - w) <= 1 for s in (hh / h, ww / w))


def patch_grid(n: int, input_hw: Grid, patch: Grid | None) -> Grid | None:
    """The grid a patch embedding makes of the input (rounded down, or up with padding), if n tokens."""
    if patch is None:
        return None
    (hh, ww), (ph, pw) = input_hw, patch
    for gh in (hh // ph, -(-hh // ph)):
        for gw in (ww // pw, -(-ww // pw)):
            if gh * gw == n:
                return gh, gw
    return None


def infer_grid(n: int, input_hw: Grid, strict: bool = False) -> Grid | None:
    """The factorisation h*w = n whose strides H/h and W/w agree best, if it fits the input."""
    hh, ww = input_hw
    best: tuple[float, Grid] | None = None
    for h in range(1, math.isqrt(n) + 1):
        if n % h:
            continue
        for g in ((h, n // h), (n // h, h)):
            if not fits(g, input_hw, strict):
                continue
            score = abs(math.log((hh / g[0]) / (ww / g[1])))
            if best is None or score < best[0]:
                best = (score, g)
    return None if best is None else best[1]


# -- what the model says -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelHints:
    """Facts about a model's token layout, read from its attributes (nothing is run)."""

    prefix: int | None = None  # prefix tokens in its token sequences; None: unknown
    patch: Grid | None = None  # patch size of its patch embedding
    channels_last: bool = False  # its 4-D outputs are NHWC (Swin)
    family: str | None = None  # "vit" (read out from prefix tokens) | "swin" (pooled grid) | None (CNN)
    source: str = ""  # where the facts come from, for messages


def _pair(v: object) -> Grid | None:
    if v is None:
        return None
    if isinstance(v, int):
        return v, v
    try:
        a, b = v  # type: ignore[misc]
        return int(a), int(b)
    except (TypeError, ValueError):
        return None


HF_PREFIX = {  # Hugging Face model_type -> prefix tokens before register tokens
    "vit": 1, "vit_msn": 1, "vit_mae": 1, "beit": 1, "data2vec-vision": 1, "dinov2": 1,
    "dinov2_with_registers": 1, "deit": 2, "clip_vision_model": 1, "ijepa": 0, "swin": 0, "swinv2": 0, "donut-swin": 0,
}
HF_SWIN = {"swin", "swinv2", "donut-swin"}


def model_hints(model: nn.Module) -> ModelHints:
    """Token facts from timm, torchvision or a Hugging Face config, or a model's own ``token_hints()``
    (a wrapper such as camcli/models/openclip.py's); empty hints for anything else."""
    own = getattr(model, "token_hints", None)
    if callable(own):
        hints = own()
        if isinstance(hints, ModelHints):
            return hints
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type in HF_PREFIX:
        prefix = HF_PREFIX[model_type] + int(getattr(config, "num_register_tokens", 0) or 0)
        family = "swin" if model_type in HF_SWIN else ("vit" if prefix else "swin")
        return ModelHints(prefix, _pair(getattr(config, "patch_size", None)), False, family,
                          f"Hugging Face {type(config).__name__}")
    if hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed"):  # timm ViT, DeiT, EVA, ...
        prefix = int(model.num_prefix_tokens)
        patch = _pair(getattr(model.patch_embed, "patch_size", None))
        return ModelHints(prefix, patch, False, "vit" if prefix else "swin", f"timm {type(model).__name__}")
    if getattr(model, "output_fmt", None) == "NHWC" and hasattr(model, "patch_embed"):  # timm Swin family
        patch = _pair(getattr(model.patch_embed, "patch_size", None))
        return ModelHints(0, patch, True, "swin", f"timm {type(model).__name__}")
    # A torchvision model was built by torchvision: no need to import it (a second) for anything else.
    tvm = sys.modules.get("torchvision.models")
    if tvm is None:
        return ModelHints()
    if isinstance(model, tvm.VisionTransformer):
        return ModelHints(1, _pair(model.patch_size), False, "vit", "torchvision VisionTransformer")
    if isinstance(model, tvm.SwinTransformer):
        first = model.features[0][0]
        return ModelHints(0, _pair(getattr(first, "stride", None)), True, "swin", "torchvision SwinTransformer")
    return ModelHints()


def detect(shape: Sequence[int], input_hw: Grid, hints: ModelHints | None = None) -> Layout | None:
    """The layout of an output of ``shape`` on an input of ``input_hw``, bound; None if none fits.

    4-D: NCHW (as always), unless only the channels-last reading gives a grid of the input (or the
    model is channels-last and both do); in a transformer, only a reading that is a grid of the input.
    3-D: tokens with the model's prefix count (or none, for the patch embedding's own output);
    without hints, the one prefix count 0..16 that leaves a grid whose integer stride divides the
    input exactly. A single channel is no token map. (Callers check that the first axis is the batch.)
    """
    hints = hints or ModelHints()
    if len(shape) == 4:
        # In a ViT the only (B, C, h, w) map is the patch projection, exactly input / patch: the
        # per-head (B, heads, N, head_dim) tensors inside attention must not pass for a grid.
        nchw_ok = fits((shape[2], shape[3]), input_hw, strict=hints.family == "vit")
        nhwc_ok = fits((shape[1], shape[2]), input_hw, strict=not hints.channels_last)
        if nhwc_ok and (hints.channels_last or not nchw_ok):
            return NHWC()
        if hints.family is not None and not nchw_ok:
            return None  # a transformer's 4-D tensor that is no grid of the input
        return NCHW()
    if len(shape) != 3 or shape[2] < 2:
        return None
    if hints.prefix is not None:
        for p in dict.fromkeys((hints.prefix, 0)):
            try:
                return Tokens(p, patch=hints.patch).bind(shape, input_hw)
            except LayoutError:
                continue
        return None
    found = [(p, g) for p in range(0, min(MAX_PREFIX, shape[1] - 1) + 1)
             if (g := infer_grid(int(shape[1]) - p, input_hw, strict=True)) is not None]
    if len(found) == 1:
        return Tokens(found[0][0], found[0][1])
    return None


class LayerLayouts:
    """The engine's view: per target layer, the bound layout for each (output shape, input size).

    ``layout``: None (detect from the model), one layout or spec for every layer, or a mapping from
    layer name to layout or spec (layers it leaves out are detected).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        layout: Layout | str | Mapping[str, Layout | str] | None = None,
    ) -> None:
        self.hints = model_hints(model)
        if isinstance(layout, Mapping):
            unknown = [k for k in layout if k not in layers]
            if unknown:
                raise UsageError(f"layout given for layer {unknown[0]!r}, which is not a target layer ({', '.join(layers)})")
            self.forced = {k: as_layout(v) for k, v in layout.items()}
        else:
            one = as_layout(layout)
            self.forced = {k: one for k in layers} if one is not None else {}
        self._bound: dict[tuple[str, tuple[int, ...], Grid], Layout] = {}

    def bind(self, layer: str, out: Tensor, x: Tensor) -> Layout:
        shape, hw = tuple(out.shape), (int(x.shape[-2]), int(x.shape[-1]))
        key = (layer, shape, hw)
        if key in self._bound:
            return self._bound[key]
        if shape and shape[0] != x.shape[0]:
            raise UsageError(
                f"layer {layer!r} outputs shape {shape} for a batch of {x.shape[0]}: its first axis is not the "
                "batch (attention windows, a broadcast tensor); choose another layer (see `camcli layers`)"
            )
        forced = self.forced.get(layer)
        if forced is not None:
            try:
                bound = forced.bind(shape, hw)
            except LayoutError as e:
                raise UsageError(
                    f"--layout {forced.spec} does not fit layer {layer!r} (output shape {shape}, input {hw[0]}x{hw[1]}): "
                    f"{e}; accepted: {LAYOUT_CHOICES}"
                ) from None
        else:
            found = detect(shape, hw, self.hints)
            if found is None:
                raise UsageError(
                    f"layer {layer!r} outputs shape {shape}; camcli cannot tell how it lies on the {hw[0]}x{hw[1]} "
                    f"input. Pass --layout nchw|nhwc|tokens:P to say ({LAYOUT_CHOICES}), or choose a layer "
                    "with a (B, C, h, w) feature map (see `camcli layers`)"
                )
            bound = found
        self._bound[key] = bound
        return bound

    def to_nchw(self, layer: str, out: Tensor, x: Tensor) -> Tensor:
        return self.bind(layer, out, x).to_nchw(out)
