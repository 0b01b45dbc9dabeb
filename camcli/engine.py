"""The engine: a batch of preprocessed images in, class activation maps out.

It knows nothing of files or the command line: the pipeline feeds it tensors, and a distributed
runner could do the same. One forward pass per batch is shared by every method, layer and target;
gradients are taken with ``torch.autograd.grad`` on the tapped activation only.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, ContextManager, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camcli import targets as tgt
from camcli.activation import probabilities
from camcli.capabilities import ModelAccess
from camcli.errors import UsageError
from camcli.hooks import LayerTap, SaturationMeter, frozen
from camcli.layouts import LayerLayouts, Layout
from camcli.maps import CONSTANT, EMPTY, REASONS, finalize, first_component, fuse_layers  # noqa: F401 (re-exported)
from camcli.hostcopy import HostPack
from camcli.methods import MethodInfo, MethodOptions, MethodOutput
from camcli.models.outputs import pick_logits
from camcli.options import Activation

@dataclass
class CamMap:
    """One explanation of one image: method x layer x target, at feature (or input) resolution."""

    method: str
    layer: str
    target: int | None
    score: float | None
    probability: float | None  # under the session's activation (none: the raw output); segmentation: pixel share
    cam: np.ndarray  # (h, w) float32: [0, 1], or [-1, 1] with signed maps
    empty: bool = False
    note: str | None = None  # EMPTY or CONSTANT when the map is blank
    channels: np.ndarray | None = None  # (N, h, w) normalised strongest channels (`activations` topN)
    channel_ids: list[int] | None = None
    region: dict[str, Any] | None = None  # segmentation: the region whose score was explained
    # a target that is no class (targets.described): its kind and what it compares with; ``score`` is
    # its value, and ``target`` and ``probability`` are None
    explained: dict[str, Any] | None = None


@dataclass
class ImageOutput:
    top: list[tuple[int, float]]  # (class index, probability or raw value; segmentation: pixel share), best first
    maps: list[CamMap] = field(default_factory=list)
    saturation: dict[str, Any] | None = None  # bounded units saturated at/after the layer


# --precision -> the dtype of torch.autocast around the model's forward passes (None: plain fp32).
AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Test-time augmentations for --aug-smooth: (horizontal flip, scale). Maps are mapped back and averaged.
AUGMENTATIONS: tuple[tuple[bool, float], ...] = ((False, 1.0), (True, 1.0), (False, 1.25), (True, 1.25))


def find_classifier(model: nn.Module, activations: Tensor, logits: Tensor, layer: str) -> Tensor:
    """The (classes, K) weights of a linear head fed by global average pooling of ``activations``.

    Proven numerically, not guessed from names: mean_ij A @ W.T + b must reproduce the logits.
    """
    k = activations.shape[1]
    pooled = activations.detach().float().mean(dim=(2, 3))
    tol = 1e-3 if logits.dtype in (torch.float32, torch.float64) else 3e-2  # bf16/fp16 logits: 3 digits
    for _, mod in reversed(list(model.named_modules())):
        if isinstance(mod, nn.Linear) and mod.in_features == k and mod.out_features == logits.shape[1]:
            pred = F.linear(pooled, mod.weight.float(), None if mod.bias is None else mod.bias.float())
            if torch.allclose(pred, logits.detach().float(), rtol=tol, atol=tol * float(logits.abs().max()) + 1e-4):
                return mod.weight.detach()
    raise UsageError(
        f"method 'cam' needs layer {layer!r} to feed global-average-pool -> linear directly; "
        "it does not in this model. Use gradcam (equal to CAM on such heads) or the last conv layer",
        layer_hint=True,
    )


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from besides the model: resolved objects, no command-line text.

    ``methods`` should all fit the model: :func:`unfit` names those that do not, before an engine is built.
    """

    layers: Sequence[str]
    methods: Sequence[MethodInfo]
    options: MethodOptions = field(default_factory=MethodOptions)
    signed: bool = False
    output_key: str | int | None = None
    per_layer: bool = False
    aug_smooth: bool = False
    eigen_smooth: bool = False
    channels_last: bool = False  # feed inputs as NHWC (the caller converted the model)
    top_k: int = 5
    region: tgt.Region | None = None  # segmentation models: explain this region instead of the predicted pixels
    layout: Layout | str | Mapping[str, Layout | str] | None = None  # None: found from the model
    precision: str = "fp32"  # the model's forward passes; maps are always computed in fp32
    # How classifier outputs become the records' values and the top-k ranking (resolved: never auto);
    # segmentation models rank by pixel shares whatever it is.
    activation: Activation = Activation.SOFTMAX
    # --score probability: a class's map explains its value under the activation, not its logit
    explain_probability: bool = False

    def __post_init__(self) -> None:
        if not self.layers:
            raise UsageError("no target layer given")
        if not self.methods:
            raise UsageError("no method given")
        if self.precision not in AUTOCAST:
            raise UsageError(f"precision {self.precision!r} is not one of {', '.join(AUTOCAST)} (resolve 'auto' first)")
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "methods", tuple(self.methods))
        if self.options is None:
            object.__setattr__(self, "options", MethodOptions())
        if Activation(self.activation) is Activation.AUTO:
            raise UsageError("activation 'auto' must be resolved from the model first (camcli.activation.resolve)")
        object.__setattr__(self, "activation", Activation(self.activation))

    @property
    def needs_gradients(self) -> bool:
        return any(m.needs_gradients for m in self.methods)


def autocast(precision: str, device: torch.device) -> ContextManager[object]:
    """torch.autocast at ``precision`` on ``device``; nothing for fp32."""
    dtype = AUTOCAST[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def forward_logits(model: nn.Module, config: EngineConfig, x: Tensor) -> Tensor:
    """Every model call the engine and the methods make: NHWC input, autocast, logits picked."""
    if config.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(config.precision, x.device):
        return pick_logits(model(x), config.output_key)


def tapped(
    layers: Sequence[str], layouts: LayerLayouts, outputs: Mapping[str, Tensor], x: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """(raw layer outputs as tapped, the same put in (B, C, h, w) by each layer's layout)."""
    missing = [n for n in layers if n not in outputs]
    if missing:
        raise UsageError(f"layer {missing[0]!r} was not called during the forward pass; choose another layer",
                         layer_hint=True)
    raws = [outputs[n] for n in layers]
    return raws, [layouts.to_nchw(n, r.detach(), x) for n, r in zip(layers, raws)]


def _probe(
    model: nn.Module, config: EngineConfig, layouts: LayerLayouts, example: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """One forward of ``example`` without gradients: (logits, each layer's activations in (B, C, h, w))."""
    with frozen(model), LayerTap(model, config.layers) as tap, torch.inference_mode():
        logits = forward_logits(model, config, example)
        return logits, tapped(config.layers, layouts, tap.activations, example)[1]


@contextmanager
def _layer_hint() -> Iterator[None]:
    """UsageErrors raised inside are about the chosen layer or method: mark them (``layer_hint``)."""
    try:
        yield
    except UsageError as e:
        e.layer_hint = True
        raise


def unfit(model: nn.Module, config: EngineConfig, example: Tensor) -> dict[str, str]:
    """The methods of ``config`` that cannot work on this model, each with a one-line reason.

    Decided before an engine is built (``--method all``): build it from ``fitting(config, reasons)``.
    """
    reasons: dict[str, str] = {}
    logits, acts = _probe(model, config, LayerLayouts(model, config.layers, config.layout), example)
    for m in config.methods:
        if m.needs_classifier:
            try:
                for layer, a in zip(config.layers, acts):
                    find_classifier(model, a, logits, layer)
            except UsageError:
                reasons[m.name] = "the layer does not feed global-average-pool -> linear directly"
        if m.check is not None:
            try:
                with frozen(model):
                    m.check(model, example)
            except UsageError as e:
                reasons[m.name] = str(e).split(". ")[0]
    return reasons


def fitting(config: EngineConfig, reasons: Mapping[str, str]) -> EngineConfig:
    """``config`` without the methods named in ``reasons``."""
    return replace(config, methods=[m for m in config.methods if m.name not in reasons])


class CamEngine:
    """Computes maps for a batch. Holds the model and choices, no per-batch state.

    It takes resolved objects only (modules, layer names, method entries, target specs): no
    command-line text, no lookup of methods by name. What a method may call comes from
    :class:`camcli.capabilities.ModelAccess`.
    """

    def __init__(self, model: nn.Module, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        self.layers = list(config.layers)
        self.methods = config.methods
        self.options = config.options
        self.signed = config.signed
        self.output_key = config.output_key
        self.per_layer = config.per_layer
        self.aug_smooth = config.aug_smooth
        self.eigen_smooth = config.eigen_smooth
        self.channels_last = config.channels_last
        self.top_k = config.top_k
        self.region = config.region
        self.precision = config.precision
        self._classifier: dict[str, Tensor] = {}
        # Layer outputs -> (B, C, h, w) before any method sees them (tokens, NHWC); None: found from the model.
        self.layouts = LayerLayouts(model, self.layers, config.layout)
        self._methods_checked = False  # each method's own check (MethodInfo.check) has run on this model

    @property
    def needs_gradients(self) -> bool:
        return self.config.needs_gradients

    def autocast(self, device: torch.device) -> ContextManager[object]:
        """torch.autocast at this engine's precision on ``device``; nothing for fp32."""
        return autocast(self.precision, device)

    def _forward(self, x: Tensor) -> Tensor:
        """Every model call the engine and the methods make: NHWC input, autocast, logits picked."""
        return forward_logits(self.model, self.config, x)

    def _activations(self, outputs: Mapping[str, Tensor], x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(raw layer outputs as tapped, the same put in (B, C, h, w) by each layer's layout)."""
        return tapped(self.layers, self.layouts, outputs, x)

    def check(self, example: Tensor, seen: tuple[Tensor, Any, Mapping[str, Tensor]] | None = None) -> None:
        """Checks that need a forward pass (layer shapes, the CAM head, each method's own) before real work.

        ``seen``: (input, model output, layer outputs) of a forward already made (the model's
        load-time probe, ``LoadedModel.probe``), used instead of running the model again.
        A UsageError that another layer may fix carries ``layer_hint``.
        """
        if seen is None:
            logits, acts = _probe(self.model, self.config, self.layouts, example)
        else:
            x, output, outputs = seen
            with torch.inference_mode():
                logits, acts = pick_logits(output, self.output_key), self._activations(outputs, x)[1]
        with _layer_hint():
            with torch.inference_mode():
                self._check_layers(logits, acts)
            self._check_methods(example)

    def _check_methods(self, example: Tensor) -> None:
        """Methods that cannot work on this model say so before any work, on every path: from
        ``check`` (Session.open) or, for an engine built and used directly, on its first batch."""
        for m in self.methods:
            if m.check is not None:
                m.check(self.model, example)
        self._methods_checked = True

    def _check_layers(self, logits: Tensor, acts: list[Tensor]) -> None:
        for layer, a in zip(self.layers, acts):
            if any(m.needs_classifier for m in self.methods):
                self._classifier[layer] = find_classifier(self.model, a, logits, layer)
            for m in self.methods:
                if m.check_layer is not None:
                    m.check_layer(self.options, a)

    # -- the main entry point -------------------------------------------------------------------
    def maps(
        self, x: Tensor, specs: Sequence[tgt.TargetSpec], sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[ImageOutput]:
        """Explain a batch (B, 3, H, W) for the given target specs. One forward pass for all.

        ``sizes``: each image's original (H, W), for a segmentation region given in image pixels.
        Everything stays on the model's device until one packed copy brings the batch's maps,
        flags, scores, probabilities, top-k and saturation to the host (camcli.hostcopy).
        """
        if not self._methods_checked:
            with _layer_hint():
                self._check_methods(x[:1])
        batch, targets = self._explain(x, specs, None, sizes)
        if self.aug_smooth:
            self._aug_average(x, specs, batch, targets)
        return self._to_host(batch)

    def _explain(
        self,
        x: Tensor,
        specs: Sequence[tgt.TargetSpec],
        fixed: list[tgt.Target] | None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[_Batch, list[tgt.Target]]:
        b = x.shape[0]
        grad_mode = self.needs_gradients
        with frozen(self.model), LayerTap(self.model, self.layers) as tap:
            with SaturationMeter(self.model, self.layers) as meter:
                if grad_mode:
                    with torch.enable_grad():
                        logits = self._forward(x)
                else:
                    with torch.inference_mode():
                        logits = self._forward(x)
            raws, acts = self._activations(tap.activations, x)
            scores = logits.detach().float()
            # Per class and image: the probability under the activation (none: the raw output), or for
            # segmentation the pixel share.
            probs = tgt.pixel_shares(scores) if scores.dim() == 4 else probabilities(scores, self.config.activation)
            top_p, top_i = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
            batch = _Batch(scores, probs, top_p, top_i, meter.saturated, meter.units, list(meter.modules))
            targets = tgt.resolve(specs, scores, self.region, sizes, probs,
                                  self.config.activation if self.config.explain_probability else None) if fixed is None else fixed
            rows = torch.arange(b, device=logits.device)
            agnostic_done = False
            for target in targets:
                access = self._access(tap, x, target, logits, raws, rows, grad_mode)
                for method in self.methods:
                    if not method.needs_target and agnostic_done:
                        continue
                    m_access = access
                    if method.retarget is not None:  # the method explains another scalar (a contrast)
                        other = method.retarget(target, scores, self.options)
                        m_access = self._access(tap, x, other, logits, raws, rows, grad_mode)
                    results = []
                    for name, a in zip(self.layers, acts):
                        classifier = self._classifier_weights(method, name, a, logits)
                        inputs = m_access.inputs_for(method, name, a, classifier, self.options)
                        with torch.no_grad():
                            results.append(self._reduce(method.fn(inputs)))
                        if method.pixel_space and not method.needs_gradients:
                            break  # the layer plays no part: one map is enough
                    batch.entries.extend(self._entries(method, target, scores, results))
                agnostic_done = True
        return batch, targets

    def _access(
        self, tap: LayerTap, x: Tensor, target: tgt.Target, logits: Tensor, raws: Sequence[Tensor], rows: Tensor,
        grad_mode: bool,
    ) -> ModelAccess:
        """What the methods may use for one target; its gradients are taken when a method first reads them."""
        grads = None
        if grad_mode:
            def grads() -> list[Tensor]:
                with torch.enable_grad():  # first read inside a method, which runs under no_grad
                    return self._gradients(target.score(logits, rows).sum(), raws, x)
        return ModelAccess(self._forward, tap, x, target, model=self.model, logits=logits, layouts=self.layouts,
                           layers=self.layers, gradients=grads)

    def _gradients(self, score: Tensor, raws: Sequence[Tensor], x: Tensor) -> list[Tensor]:
        """d score / d each raw layer output, put in (B, C, h, w) by the same layout (a pure reshape)."""
        grads = torch.autograd.grad(score, list(raws), retain_graph=True)
        return [self.layouts.to_nchw(n, g, x) for n, g in zip(self.layers, grads)]

    def _reduce(self, raw: Tensor | MethodOutput) -> MethodOutput:
        """(B, K, h, w) weighted activations -> (B, h, w): channel sum, or first component (--eigen-smooth)."""
        out = raw if isinstance(raw, MethodOutput) else MethodOutput(cam=raw)
        if out.cam.dim() == 4:
            out.cam = first_component(out.cam) if self.eigen_smooth else out.cam.sum(dim=1)
        return out

    def _classifier_weights(self, method: MethodInfo, layer: str, a: Tensor, logits: Tensor) -> Tensor | None:
        if not method.needs_classifier:
            return None
        if layer not in self._classifier:
            self._classifier[layer] = find_classifier(self.model, a, logits, layer)
        return self._classifier[layer]

    def _entries(
        self, method: MethodInfo, target: tgt.Target, scores: Tensor, results: list[MethodOutput]
    ) -> list[_Entry]:
        """Finalised maps of one method and target slot: the fused map, then each layer's (--per-layer)."""
        rows = torch.arange(scores.shape[0], device=scores.device)
        target_scores = target.score(scores, rows)
        shares, kind = (target.shares(), target.kind) if isinstance(target, tgt.SegmentTarget) else (None, None)
        finals = [finalize(r.cam, self.signed) for r in results]
        named: list[tuple[str, tuple[Tensor, Tensor, Tensor], MethodOutput]] = []
        if len(results) == 1:
            only = "input" if method.pixel_space and not method.needs_gradients else self.layers[0]
            named.append((only, finals[0], results[0]))
        else:
            fused = finalize(fuse_layers([f[0] for f in finals]), self.signed)
            named.append(("+".join(self.layers), fused, results[-1]))
            if self.per_layer:
                named.extend(zip(self.layers, finals, results))
        entries = []
        for layer_name, (maps, _, code), res in named:
            chans = None
            if res.channels is not None:
                chans = finalize(res.channels.flatten(0, 1), False)[0].reshape(res.channels.shape)
            entries.append(_Entry(method, layer_name, target.classes, target_scores, shares, kind, maps, code,
                                  chans, res.channel_ids, tgt.described(target)))
        return entries

    def _to_host(self, batch: _Batch) -> list[ImageOutput]:
        """One packed device-to-host copy for the batch, then per-image records from numpy."""
        pack = HostPack()
        top = (pack.add(batch.top_i), pack.add(batch.top_p))
        sat = None
        if batch.saturated is not None and batch.units is not None:
            sat = (pack.add(batch.saturated), pack.add(batch.units))
        handles = []
        for e in batch.entries:
            col = e.classes.clamp(min=0)[:, None]
            handles.append((
                pack.add(e.classes), pack.add(e.scores),
                pack.add(batch.probs.gather(1, col)[:, 0]), pack.add(e.maps), pack.add(e.code),
                None if e.channels is None else pack.add(e.channels),
                None if e.channel_ids is None else pack.add(e.channel_ids),
                None if e.shares is None else pack.add(e.shares),
            ))
        host = pack.fetch()
        top_i, top_p = host[top[0]], host[top[1]]
        outputs = [ImageOutput(top=list(zip(top_i[i].tolist(), top_p[i].tolist()))) for i in range(len(top_i))]
        if sat is not None:
            saturated, units = host[sat[0]], host[sat[1]]
            for i, out in enumerate(outputs):
                out.saturation = {
                    "share": round(float(saturated[i]) / float(units[i]), 6),
                    "units": int(units[i]),
                    "modules": list(batch.modules),
                }
        for e, (hc, hs, hp, hm, hcode, hch, hids, hsh) in zip(batch.entries, handles):
            classes, score, prob, maps, code = host[hc], host[hs], host[hp], host[hm], host[hcode]
            chans = None if hch is None else host[hch]
            ids = None if hids is None else host[hids]
            share = None if hsh is None else host[hsh]
            has_target = e.method.needs_target
            about = e.about if has_target else None
            for i, out in enumerate(outputs):
                c = int(classes[i])
                if c < 0:
                    continue
                out.maps.append(
                    CamMap(
                        method=e.method.name,
                        layer=e.layer,
                        target=c if has_target and about is None else None,
                        score=float(score[i]) if has_target else None,
                        probability=float(prob[i]) if has_target and about is None else None,
                        cam=maps[i].copy(),  # its own memory, not a view of the batch's (pinned) buffer
                        empty=bool(code[i]),
                        note=REASONS[int(code[i])],
                        channels=None if chans is None else chans[i].copy(),
                        channel_ids=None if ids is None else ids[i].tolist(),
                        region=None if (share is None or not has_target) else tgt.describe_region(e.region_kind, float(share[i])),
                        explained=about,
                    )
                )
        return outputs

    def _aug_average(
        self, x: Tensor, specs: Sequence[tgt.TargetSpec], base: _Batch, targets: list[tgt.Target]
    ) -> None:
        """--aug-smooth: the same targets under flips and rescales, maps mapped back and averaged (on the device)."""
        sums = [e.maps.clone() for e in base.entries]
        h, w = x.shape[-2:]
        for flip, scale in AUGMENTATIONS[1:]:
            xa = x.flip(-1) if flip else x
            if scale != 1.0:
                xa = F.interpolate(xa, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
            other, _ = self._explain(xa, specs, targets)
            for j, e in enumerate(other.entries):
                cam = F.interpolate(e.maps[:, None], size=sums[j].shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                sums[j] = sums[j] + (cam.flip(-1) if flip else cam)
        for e, total in zip(base.entries, sums):
            e.maps, _, e.code = finalize(total / len(AUGMENTATIONS), self.signed)


@dataclass
class _Entry:
    """One method x layer x target slot for the whole batch, still on the device."""

    method: MethodInfo
    layer: str
    classes: Tensor  # (B,) long; -1: this image has no map in this slot
    scores: Tensor  # (B,) the target's score per image
    shares: Tensor | None  # (B,) a segmentation region's share of the output grid
    region_kind: str | None
    maps: Tensor  # (B, h, w) finalised
    code: Tensor  # (B,) uint8 blank-map reason, an index into REASONS
    channels: Tensor | None = None  # (B, N, h, w) normalised strongest channels (`activations` topN)
    channel_ids: Tensor | None = None  # (B, N)
    about: dict[str, Any] | None = None  # targets.described: a target that is no class


@dataclass
class _Batch:
    """A batch's results on the device, until :meth:`CamEngine._to_host` copies them in one go."""

    scores: Tensor  # (B, classes) float logits
    probs: Tensor
    top_p: Tensor  # (B, k)
    top_i: Tensor
    saturated: Tensor | None  # (B,) saturated bounded units at/after the layer
    units: Tensor | None
    modules: list[str]
    entries: list[_Entry] = field(default_factory=list)
