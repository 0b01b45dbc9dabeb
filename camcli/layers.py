"""Layer names: trace output shapes and layouts, choose a default, resolve ``--layer`` with suggestions."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from camcli.errors import UsageError, suggest
from camcli.layouts import NCHW, Grid, Layout, LayoutError, Tokens, as_layout, detect, model_hints


@dataclass(frozen=True)
class LayerInfo:
    name: str
    type: str
    shape: tuple[int, ...] | None  # output shape on the traced input, None when not a tensor / not run
    finished: int  # order in which its forward finished (-1: not called)
    layout: Layout | None = None  # how the output lies on the input (None: no feature map camcli can read)
    norm: bool = False  # a normalisation layer (LayerNorm, RMSNorm, ...)
    block: str | None = None  # the repeated block it belongs to (an item of a ModuleList/Sequential)
    preferred: bool = False  # the layer the model family's rule picks as default (transformers)
    calls: int = 1  # how many times its forward ran in the traced forward pass (0: not called)

    @property
    def grid(self) -> Grid | None:
        """The (h, w) feature grid of the output, None when it has none."""
        if self.shape is None:
            return None
        layout = self.layout
        if layout is None and len(self.shape) == 4:
            layout = NCHW()  # LayerInfo built by hand: the old (B, C, h, w) reading
        if layout is None:
            return None
        try:
            return layout.grid_of(self.shape)
        except LayoutError:
            return None

    @property
    def spatial(self) -> bool:
        g = self.grid
        return g is not None and (g[0] > 1 or g[1] > 1)

    @property
    def layout_text(self) -> str:
        """'nchw 7x7', 'nhwc 7x7', 'tokens:1 14x14', or '-'."""
        g = self.grid
        return "-" if g is None or self.layout is None else f"{self.layout.spec} {g[0]}x{g[1]}"


def _is_norm(mod: nn.Module) -> bool:
    return not isinstance(mod, nn.Identity) and "norm" in type(mod).__name__.lower()


def _blocks(model: nn.Module) -> dict[str, str]:
    """Module name -> its nearest ancestor-or-self that is an item of a ModuleList / Sequential."""
    mods = dict(model.named_modules())
    items = {n for n in mods if n and isinstance(mods[n.rsplit(".", 1)[0] if "." in n else ""], (nn.ModuleList, nn.Sequential))}
    out: dict[str, str] = {}
    for name in mods:
        parts = name.split(".")
        for k in range(len(parts) - 1, 0, -1):
            anc = ".".join(parts[:k])
            if anc in items:
                out[name] = anc
                break
    return out


class LayerTrace:
    """Forward hooks on every named module while inside: each output's shape, the order in which the
    forwards finished, and the outputs of the layers in ``keep`` (copied: later operations may write
    into them) and of the last module with a 4-D spatial output (the usual default layer, kept
    without a copy when nothing wrote into it afterwards). One forward then serves the model's
    load-time probe, the default layer and the engine's checks. Hooks are removed on every path.
    """

    def __init__(self, model: nn.Module, keep: Iterable[str] = ()) -> None:
        self.model = model
        self.keep = set(keep)
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        self.order: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._finished = 0
        self.kept: dict[str, object] = {}
        self._last_spatial: tuple[str, Tensor, int | None] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "LayerTrace":
        try:
            for name, mod in self.model.named_modules():
                if name:
                    self._handles.append(mod.register_forward_hook(self._hook(name)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._last_spatial is not None:
            name, out, version = self._last_spatial
            # Under inference mode tensors have no version counter: then it is not kept.
            if version is not None and _version(out) == version:
                self.kept.setdefault(name, out)
            self._last_spatial = None

    def _hook(self, name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: object, out: object) -> None:
            self.shapes[name] = tuple(out.shape) if isinstance(out, Tensor) else None
            self._finished += 1  # a module called twice finishes twice: its last call counts
            self.order[name] = self._finished
            self.calls[name] = self.calls.get(name, 0) + 1
            if name in self.keep:
                self.kept[name] = out.clone() if isinstance(out, Tensor) else out
            if isinstance(out, Tensor) and out.dim() == 4 and (out.shape[2] > 1 or out.shape[3] > 1):
                self._last_spatial = (name, out, _version(out))

        return hook


def _version(t: Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors have no version counter
        return None


def layer_names(names: Sequence[str] | None) -> list[str]:
    """``--layer`` names as dotted names (``blocks[6]`` -> ``blocks.6``), unchecked."""
    return [n.replace("[", ".").replace("]", "") for n in names or ()]


def trace_layers(model: nn.Module, example: Tensor, layout: Layout | str | None = None) -> list[LayerInfo]:
    """Every named module with its output shape and layout on ``example``, in module-tree order.

    Layouts are detected from the model (``camcli.layouts.detect``), or ``layout`` where it fits.
    One layer may be marked ``preferred``: the default the model family's rule picks (see
    ``family_default``); ``default_layer`` returns it.
    """
    with LayerTrace(model) as trace, torch.inference_mode():
        model(example)
    return layer_infos(model, trace, tuple(example.shape), layout)


def layer_infos(
    model: nn.Module, trace: LayerTrace, input_shape: tuple[int, ...], layout: Layout | str | None = None
) -> list[LayerInfo]:
    """:func:`trace_layers`' answer from a trace already made on an input of ``input_shape``."""
    shapes, order = trace.shapes, trace.order
    hints = model_hints(model)
    forced = as_layout(layout)
    hw = (int(input_shape[-2]), int(input_shape[-1]))
    blocks = _blocks(model)

    def layout_of(shape: tuple[int, ...] | None) -> Layout | None:
        if shape is None or not shape or shape[0] != input_shape[0]:
            return None  # not a tensor, or its first axis is not the batch (attention windows)
        if forced is None:
            return detect(shape, hw, hints)
        try:
            return forced.bind(shape, hw)
        except LayoutError:
            return None

    infos = [
        LayerInfo(
            name, type(mod).__name__, shapes.get(name), order.get(name, -1), layout_of(shapes.get(name)),
            _is_norm(mod), blocks.get(name), calls=trace.calls.get(name, 0),
        )
        for name, mod in model.named_modules()
        if name
    ]
    pick = family_default(infos, hints.family)
    return [replace(i, preferred=True) if i.name == pick else i for i in infos]


def family_default(infos: list[LayerInfo], family: str | None = None) -> str | None:
    """The default layer of a transformer, None for a CNN (whose default is the last spatial layer).

    ViT-like (the head reads prefix tokens): the first norm of the last block, because the last
    block's output reaches the head only through its class token, so its patch tokens get no
    gradient. Swin-like (the head pools the grid): the last norm with a spatial output, i.e. the
    final norm after the last stage; when that norm lies inside a block (an average-pooled ViT
    without a class token has no final norm on the grid), the output of its block. ``family`` comes from the model; without it, a model whose last
    spatial output is tokens (with prefix: ViT-like) or NHWC (Swin-like) counts as a transformer.
    """
    spatial = [i for i in infos if i.spatial and i.finished >= 0]
    if not spatial:
        return None
    last = max(spatial, key=lambda i: i.finished)
    if family is None:
        if isinstance(last.layout, Tokens):
            family = "vit" if last.layout.prefix > 0 else "swin"
        elif last.layout is not None and not isinstance(last.layout, NCHW):
            family = "swin"
        else:
            return None
    norms = [i for i in spatial if i.norm]
    if family == "vit":
        in_blocks = [i for i in norms if isinstance(i.layout, Tokens) and i.block is not None]
        if not in_blocks:
            return None
        last_block = max(in_blocks, key=lambda i: i.finished).block
        return min((i for i in in_blocks if i.block == last_block), key=lambda i: i.finished).name
    if not norms:
        return None
    last_norm = max(norms, key=lambda i: i.finished)
    if last_norm.block is not None:
        # A norm inside a repeated block feeds one branch only (an average-pooled ViT's last
        # blocks.N.norm2 feeds just the MLP): take that block's output, which the head pools.
        block = next((i for i in spatial if i.name == last_norm.block), None)
        if block is not None:
            return block.name
    return last_norm.name


def default_layer(infos: list[LayerInfo], segmentation_classes: int | None = None) -> str:
    """The family rule's layer for transformers (``preferred``), else the last layer (by when its
    forward finished) whose output is a spatial map. A module that ran more than once in the forward
    (one module used at several places) is never the default: its output is not one map.

    ``segmentation_classes``: a segmentation model's class count; layers with that many channels are its
    score maps, not features, and are passed over when a feature layer exists. A segmentation model
    with a ``backbone`` (torchvision's fcn, deeplabv3, lraspp) gets the backbone's last stage: its
    head's last layers are followed only by a 1x1 convolution and an upsampling, where Grad-CAM's
    weights are the class's convolution weights whatever the region, so ``--region`` would change
    nothing there (see ``segmentation_default``).
    """
    for i in infos:
        if i.preferred:
            return i.name
    spatial = [i for i in infos if i.spatial and i.finished >= 0 and i.calls <= 1]
    if segmentation_classes is not None:
        stage = segmentation_default(spatial)
        if stage is not None:
            return stage
        features = [i for i in spatial if i.shape is not None and i.shape[1] != segmentation_classes]
        spatial = features or spatial
    if not spatial:
        raise UsageError(
            "no layer of this model outputs a spatial map camcli can read ((B, C, h, w), channels-last, or tokens "
            "on the input's patch grid); pass --layer, and --layout nchw|nhwc|tokens:P to say how it lies"
        )
    return max(spatial, key=lambda i: i.finished).name


def segmentation_default(spatial: list[LayerInfo]) -> str | None:
    """The last stage of a segmentation model's ``backbone`` (the direct child of ``backbone`` with a
    spatial output that finishes last: ``backbone.layer4`` of a ResNet, ``backbone.16`` of a
    MobileNetV3), as pytorch-grad-cam's segmentation tutorial uses; None without a backbone."""
    stages = [i for i in spatial if i.name.startswith("backbone.") and i.name.count(".") == 1]
    return max(stages, key=lambda i: i.finished).name if stages else None


def check_single_calls(layers: Sequence[str], infos: list[LayerInfo], model_name: str) -> None:
    """UsageError when a chosen layer's module ran more than once in one forward pass (one module
    used at several places): a tap sees only one of its outputs, so the map would silently follow
    one call, or the logits would not depend on the output it sees at all."""
    calls = {i.name: i.calls for i in infos}
    for name in layers:
        if calls.get(name, 1) > 1:
            raise UsageError(
                f"layer {name!r} runs {calls[name]} times in one forward pass (one module used at several places); "
                "a map needs the layer's one output per image: choose a layer that runs once, such as the block "
                f"that holds it (see `camcli layers --model {model_name}`)"
            )


def resolve_layers(model: nn.Module, names: Sequence[str], model_name: str) -> list[str]:
    """``("layer4",)`` or ``("layer3", "layer4")`` -> checked dotted names (``blocks.6.0`` style)."""
    known = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for n, dotted in zip(names, layer_names(names)):
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
    model: nn.Module,
    names: Sequence[str] | None,
    model_name: str,
    example: Tensor,
    layout: Layout | str | None = None,
    segmentation_classes: int | None = None,
    traced: list[LayerInfo] | None = None,
) -> list[str]:
    """``--layer`` resolved, or the default layer when none was given: from ``traced`` (the model's
    load-time trace) when given, else traced on ``example``."""
    if names:
        return resolve_layers(model, names, model_name)
    infos = traced if traced is not None else trace_layers(model, example, layout)
    return [default_layer(infos, segmentation_classes)]
