"""One session opens everything a command needs to compute maps: device, model, preprocessing,
layers, targets, methods and engine. `explain`, `check` and `evaluate` (and any runner) open the
same Session from their options and differ only in what they do with the maps.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from camcli import activation as act
from camcli import options as O
from camcli import targets as tgt
from camcli.engine import CamEngine, EngineConfig, ImageOutput, fitting, forward_logits, unfit
from camcli.errors import ImageError, UsageError
from camcli.images import Preprocess, read_image
from camcli.layers import check_single_calls, choose_layers, layer_infos, layer_names, trace_layers
from camcli.methods import MethodInfo, MethodOptions, parse_methods
from camcli.models import LoadedModel, load_model
from camcli.models.clip import is_clip
from camcli.models.load import file_sha256, import_object
from camcli.models.outputs import pick_logits
from camcli.options import Activation, ExplainOptions, ImagesOptions, MapOptions


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an unavailable device is a usage error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (accepted here: auto, cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available on this machine (accepted here: auto, cpu)")
    return torch.device(name)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name one device (when 0 is the current one)."""
    if a.type != b.type:
        return False
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def resolve_precision(name: str, device: torch.device) -> str:
    """``--precision`` for ``device``: ``auto`` becomes bf16 on a CUDA device that supports it, else
    fp32; a precision the device cannot run is a usage error (fp16 is refused off CUDA, not replaced)."""
    cuda = device.type == "cuda"
    if name == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and not cuda:
        raise UsageError(
            f"--precision fp16 runs on CUDA only (device here: {device.type}); half-precision convolutions on "
            "the CPU are slow or missing. Use bf16 or fp32 (accepted here: fp32, bf16, auto)"
        )
    if name == "bf16" and device.type not in ("cpu", "cuda"):
        raise UsageError(f"--precision bf16 runs on CUDA and the CPU, not on {device.type} (accepted here: fp32, auto)")
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU has no bfloat16 support (accepted here: fp32, fp16, auto)")
    return name


# Options unset by default whose MethodOptions default applies when they are not given.
BLACK_BOX = ("occlusion_window", "occlusion_stride", "occlusion_fill", "rise_masks", "rise_grid", "rise_keep")


def method_options(opts: MapOptions) -> MethodOptions:
    """The knobs methods read, from any command's options (under the flags' names)."""
    return MethodOptions(
        score_channels=opts.score_channels,
        perturbation_batch=opts.perturbation_batch,
        channels=opts.channels,
        samples=opts.samples,
        noise=opts.noise,
        seed=opts.seed,
        progress=not opts.quiet,
        finer_base=opts.finer_base,
        finer_alpha=opts.finer_alpha,
        finer_references=opts.finer_references,
        discard_ratio=opts.discard_ratio,
        **{name: value for name in BLACK_BOX if (value := getattr(opts, name)) is not None},
    )


def stderr_warning(msg: str) -> None:
    print(f"camcli: warning: {msg}", file=sys.stderr)


def _quiet(msg: str) -> None:
    """-q: no messages."""


def _asks_all(names: Sequence[str]) -> bool:
    return any(n.lower() == "all" for n in names)


def engine_config(
    opts: MapOptions, layers: Sequence[str], methods: Sequence[MethodInfo], mopts: MethodOptions, precision: str,
    activation: Activation | None = Activation.SOFTMAX,
) -> EngineConfig:
    """The engine's configuration from any command's options and what they resolved to
    (``activation``: resolved by camcli.activation.resolve; None, a segmentation model's, ranks by pixel shares)."""
    return EngineConfig(
        layers, methods, options=mopts, signed=opts.signed, output_key=opts.output_key,
        per_layer=isinstance(opts, ExplainOptions) and opts.per_layer,
        aug_smooth=opts.aug_smooth, eigen_smooth=opts.eigen_smooth,
        channels_last=True, region=tgt.parse_region(opts.region, opts.region_mask),
        layout=opts.layout, precision=precision, activation=activation or Activation.SOFTMAX,
        explain_probability=getattr(opts, "score", None) == "probability",
    )


def resolve_activation(opts: MapOptions, lm: LoadedModel, warn: Callable[[str], None]) -> Activation | None:
    """``--activation`` for this model, once per session (auto: camcli.activation's rules); None for
    a segmentation model. Softmax over one output is always 1: a warning says so."""
    resolved = act.resolve(opts.activation, outputs=lm.num_classes, task=lm.task, named=lm.labels is not None,
                           problem_type=lm.problem_type,
                           scalar_target=bool(getattr(opts, "reference", None) or getattr(opts, "target", None)
                                              or len(getattr(opts, "text", None) or ()) == 1))
    if resolved is Activation.SOFTMAX and lm.num_classes == 1:
        warn("--activation softmax on a model with one output: its probability is always 1 "
             "(use sigmoid for a binary classifier's logit, none for a raw value)")
    return resolved


def _class_free(config: EngineConfig, flag: str, every: bool, warn: Callable[[str], None]) -> EngineConfig:
    """Methods that explain a class through the head's weights (cam) or a contrast of classes
    (finercam) have nothing to explain for ``--reference``/``--target``: refused, or skipped with --method all."""
    odd = {m.name: "it explains a class" for m in config.methods if m.needs_classifier or m.retarget is not None}
    if odd and not every:
        name = next(iter(odd))
        raise UsageError(f"--method {name} explains a class (the classifier's weights or a contrast of classes); "
                         f"{flag} explains another scalar: use gradcam, layercam, scorecam or another method")
    for name in odd:
        warn(f"--method all: skipping {name}: {flag} explains no class")
    return fitting(config, odd)


def _check_task(lm: LoadedModel, config: EngineConfig) -> None:
    """Options that only make sense for one kind of model."""
    if lm.task == "segmentation" and config.aug_smooth:
        raise UsageError("--aug-smooth is for classifiers: flipped and rescaled segmentation outputs do not "
                         "line up with the region (drop --aug-smooth)")
    if lm.task == "segmentation" and config.explain_probability:
        raise UsageError("--score probability is for classifiers: a segmentation model's class score is summed "
                         "over a region (accepted here: --score logit)")
    if lm.task != "segmentation" and config.region is not None:
        raise UsageError("--region and --region-mask are for segmentation models (output batch x classes x H x W); "
                         f"{lm.name} is a classifier")


def _output_target(opts: MapOptions) -> tuple[str, Any]:
    """``--reference`` or ``--target`` as given: (flag, value), or ("", None) when neither is.
    Refused together, and with an explicit ``--class``: they explain one scalar of the output, no class."""
    reference, target = getattr(opts, "reference", None), getattr(opts, "target", None)
    if reference is not None and target is not None:
        raise UsageError("give --reference or --target, not both: each is the one scalar explained per image")
    flag, value = ("--reference", reference) if reference is not None else ("--target", target)
    if value is not None and isinstance(opts, ImagesOptions) and opts.classes is not None:
        raise UsageError(f"{flag} explains one scalar of the model output, not a class: drop --class "
                         f"{','.join(opts.classes)!r}")
    return ("", None) if value is None else (flag, value)


def _text_prompts(opts: MapOptions, out_flag: str) -> tuple[str, ...]:
    """``--text`` as given (no prompts: ()), checked before any model work: not with --reference or
    --target, and not with --class for one prompt (several prompts are the classes --class picks from)."""
    prompts = tuple(getattr(opts, "text", None) or ())
    if prompts and out_flag:
        raise UsageError(f"give --text or {out_flag}, not both: each is what the image embedding is compared with")
    if len(prompts) == 1 and isinstance(opts, ImagesOptions) and opts.classes is not None:
        raise UsageError(f"one --text explains the image's similarity to that prompt, not a class: drop --class "
                         f"{','.join(opts.classes)!r} (or give several prompts, the classes --class picks from)")
    return prompts


def _clip_prompts(lm: LoadedModel, prompts: tuple[str, ...], out_flag: str) -> LoadedModel:
    """A CLIP-style model with ``prompts`` encoded (once per run): its output becomes (batch, prompts)
    logits, its classes the prompts. UsageError for --text on a model with no text tower, and for a
    CLIP-style model given nothing to compare its image embedding with."""
    if not is_clip(lm.module):
        if prompts:
            raise UsageError(f"--text: model {lm.name!r} has no text tower to encode prompts with (accepted: a "
                             "CLIP-style model: a Hugging Face CLIPModel folder or an open_clip model)")
        return lm
    if not prompts and not out_flag:
        raise UsageError(f"model {lm.name!r} is CLIP-style (image and text towers) and has no classes: give --text "
                         "PROMPT (one prompt, or several as zero-shot classes), or --reference IMAGE or --target "
                         "to explain its image embedding")
    lm.module.set_prompts(prompts)  # () when explaining the image embedding itself
    if not prompts:
        return lm
    # The load-time probe saw the embedding, not these logits: the session runs forwards of its own.
    return replace(lm, num_classes=len(prompts), labels=list(prompts), probe=None)


def readable_reference(path: str, max_pixels: int) -> Any:  # noqa: ANN401
    """``--reference`` decoded as RGB (H, W, 3) uint8; UsageError (exit 2) naming it when it is no
    readable image. Checked before the model loads."""
    from pathlib import Path

    if not Path(path).is_file():
        raise UsageError(f"--reference {path!r}: no such file (an image whose embedding the outputs are compared with)")
    try:
        return read_image(path, max_pixels).rgb
    except ImageError as e:
        raise UsageError(f"--reference {path!r} is not a readable image ({str(e).removeprefix(f'{path}: ')})") from None


def callable_target(value: Any) -> tgt.Custom:  # noqa: ANN401
    """``--target`` module:function imported (exit 2 naming it when it cannot be), or a callable as is."""
    if callable(value):
        return tgt.Custom(value, tgt.callable_name(value))
    fn = import_object(str(value).strip(), "--target")
    if not callable(fn):
        raise UsageError(f"--target {value!r} is a {type(fn).__name__}, not a function of the model output")
    return tgt.Custom(fn, str(value).strip())


def reference_spec(lm: LoadedModel, config: EngineConfig, device: torch.device, path: str, rgb: Any) -> tgt.Reference:  # noqa: ANN401
    """The reference image's embedding: one forward of the same model with the same preprocessing."""
    pre = lm.preprocess()
    x = pre.normalize(pre.resize(rgb)[None].to(device))
    with torch.no_grad():  # not inference mode: its tensors could not be saved for the score's backward
        embedding = forward_logits(lm.module, config, x).detach().flatten(1)[0].float().clone()
    return tgt.Reference(path, file_sha256(path), embedding)


def probe_callable(spec: tgt.Custom, lm: LoadedModel, config: EngineConfig, example: Tensor) -> None:
    """A callable target run once on the model's output for two images: one of the wrong shape fails
    here, naming the shape it returned, before any image is read."""
    x = torch.cat([example, example.flip(-1)])
    with torch.no_grad():
        output = forward_logits(lm.module, config, x)
        try:
            got = spec.fn(output)
        except Exception as e:  # noqa: BLE001 - the user's function failed: say which, in one line
            raise UsageError(f"--target {spec.name!r} failed on the model output of shape {tuple(output.shape)}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        tgt.checked_scores(got, output, spec.name)


@dataclass
class Session:
    options: MapOptions  # ExplainOptions | EvaluateOptions | CheckOptions
    model: LoadedModel
    device: torch.device
    preprocess: Preprocess
    layers: list[str]
    specs: list[tgt.TargetSpec]
    methods: list[MethodInfo]
    engine: CamEngine
    warn: Callable[[str], None]
    # --activation as resolved for the model (never auto); None: a segmentation model (pixel shares)
    activation: Activation | None = Activation.SOFTMAX

    @classmethod
    def open(cls, opts: MapOptions, *, model: LoadedModel | None = None, device: str | None = None) -> "Session":
        """Check the options, load the model (unless given) and build and check the engine.

        ``device``: run here instead of the options' ``--device``; the options stay as given (what
        the run records). Everything that can fail on the user's input fails here, before any image is read.
        """
        opts.validate()
        warn = _quiet if opts.quiet else stderr_warning
        out_flag, out_value = _output_target(opts)  # before any model work: a bad one exits 2 at once
        reference_rgb = readable_reference(out_value, opts.max_pixels) if out_flag == "--reference" else None
        custom = callable_target(out_value) if out_flag == "--target" else None
        prompts = _text_prompts(opts, out_flag)
        mopts = method_options(opts)
        methods = [m.derive(mopts) if m.derive is not None else m for m in parse_methods(opts.method)]
        every = _asks_all(opts.method)
        device = resolve_device(opts.device if device is None else device)
        precision = resolve_precision(opts.precision, device)
        output_key = opts.output_key
        lm = model or load_model(
            opts.model, opts.weights, opts.labels,
            unsafe_load=opts.unsafe_load, image_size=opts.image_size, device=device,
            output_key=output_key, mean=opts.mean, std=opts.std,
            layers=layer_names(opts.layer),
        )
        layout = opts.layout
        # NHWC is markedly faster for convolutions on CPU (depthwise ones above all) and on CUDA.
        lm.module.to(device=device, memory_format=torch.channels_last)
        lm = _clip_prompts(lm, prompts, out_flag)  # text encoded here, once per run, never per image
        # A seeded random probe: a zero image can make a non-linear head look linear (find_classifier).
        example = torch.randn(1, 3, lm.input_size, lm.input_size, generator=torch.Generator().manual_seed(0)).to(device)
        segmentation_classes = lm.num_classes if lm.task == "segmentation" else None
        # The load-time probe's forward serves the default layer and the engine's checks when it ran on
        # this device and kept what they need; otherwise they run forwards of their own. It serves one
        # session only: the module may change afterwards, and its tensors should not outlive the load.
        probe, lm.probe = lm.probe, None
        if probe is not None and not _same_device(probe.inputs.device, device):
            probe = None
        traced = (trace_layers(lm.module, example, layout) if probe is None
                  else layer_infos(lm.module, probe.trace, tuple(probe.inputs.shape), layout))
        layers = choose_layers(lm.module, opts.layer, lm.name, example, layout, segmentation_classes, traced)
        check_single_calls(layers, traced, lm.name)  # at load, not once per image
        activation = resolve_activation(opts, lm, warn)  # once per session, not per image
        config = engine_config(opts, layers, methods, mopts, precision, activation)
        _check_task(lm, config)
        if every:  # --method all: every method that fits, a one-line reason for each one skipped
            reasons = unfit(lm.module, config, example)
            for name, why in reasons.items():
                warn(f"--method all: skipping {name}: {why}")
            config = fitting(config, reasons)
        if out_flag or len(prompts) == 1:
            config = _class_free(config, out_flag or "--text", every, warn)
        engine = CamEngine(lm.module, config)
        try:
            engine.check(example, None if probe is None else probe.seen(layers))
        except UsageError as e:
            if not e.layer_hint:
                raise
            raise UsageError(f"{e} (see `camcli layers --model {lm.name}`)") from None
        specs: list[tgt.TargetSpec]
        if custom is not None:
            probe_callable(custom, lm, config, example)
            specs = [custom]
        elif reference_rgb is not None:
            specs = [reference_spec(lm, config, device, out_value, reference_rgb)]
        elif len(prompts) == 1:
            specs = [tgt.Text(prompts[0])]
        else:
            specs = tgt.parse_class_specs(opts.classes if isinstance(opts, ImagesOptions) else None, lm.labels,
                                          lm.num_classes)
        return cls(
            options=opts, model=lm, device=device,
            preprocess=lm.preprocess(),
            layers=layers, specs=specs, methods=list(config.methods), engine=engine,
            warn=warn, activation=activation,
        )

    @property
    def precision(self) -> str:
        """The forward passes' precision as resolved for the device: fp32, bf16 or fp16."""
        return self.engine.precision

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    @property
    def layer_name(self) -> str:
        """The name the fused map of several layers carries ("a+b"), or the one layer's."""
        return "+".join(self.layers)

    def engine_for(self, module: nn.Module) -> CamEngine:
        """An engine with this session's choices on another module (a randomised copy, say)."""
        return CamEngine(module, self.engine.config)

    def explain_images(
        self,
        batch: Tensor,
        specs: Sequence[tgt.TargetSpec] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[ImageOutput]:
        """Maps for a batch of resized uint8 images (B, 3, H, W): normalised and moved here.
        ``sizes``: the original (H, W) of each image (a segmentation --region in image pixels)."""
        x = self.preprocess.normalize(batch.to(self.device, non_blocking=True))
        return self.engine.maps(x, self.specs if specs is None else specs, sizes)

    def logits(self, x: Tensor) -> Tensor:
        """(N, classes) logits of normalised inputs, without gradients."""
        with torch.inference_mode(), self.engine.autocast(self.device):
            x = x.to(self.device).contiguous(memory_format=torch.channels_last)
            return pick_logits(self.model.module(x), self.options.output_key).float()

    @property
    def value_key(self) -> str:
        """What records call the number beside a class: probability, value (--activation none) or
        pixel_share (segmentation)."""
        return "pixel_share" if self.model.task == "segmentation" else act.value_key(self.activation)

    def reference(self, path: str) -> tgt.Reference:
        """A ``--reference`` target spec for ``path`` (a check case's ``reference:``): UsageError when it
        is no readable image."""
        rgb = readable_reference(path, self.options.max_pixels)
        return reference_spec(self.model, self.engine.config, self.device, path, rgb)

    def _output_facts(self) -> dict[str, Any]:
        """A reference's file hash and a callable's name: what shapes the outputs besides the option's text."""
        facts: dict[str, Any] = {}
        for s in self.specs:
            if isinstance(s, tgt.Reference):
                facts["reference_sha256"] = s.sha256
            elif isinstance(s, tgt.Custom):
                facts["target"] = s.name
        return facts

    def _method_facts(self) -> dict[str, Any]:
        """The values the run's methods read from options unset by default (MethodInfo.reads)."""
        mopts = self.engine.options
        return {name: getattr(mopts, name) for m in self.methods for name in m.reads}

    def shaping(self) -> dict[str, Any]:
        """Everything that shapes the outputs: declared options plus what they resolved to."""
        # The activation is a resolved fact only when it is not softmax (or None, segmentation): runs
        # made before --activation existed read every output through softmax, and keep their fingerprints.
        extra = {} if self.activation in (None, Activation.SOFTMAX) else {"activation": self.activation.value}
        return O.shaping(
            self.options, model_sha256=self.model.weights_sha256, layers=self.layers,
            classes=[str(s) for s in self.specs], methods=[m.name for m in self.methods],
            precision=self.precision, **extra, **self._output_facts(), **self._method_facts(),
        )

    def fingerprint(self) -> str:
        return O.digest(self.shaping())

    def record(self) -> dict[str, Any]:
        """The options for summary.json, with names resolved (methods, layers, classes)."""
        rec = O.record(self.options)
        rec["method"] = [m.name for m in self.methods]
        rec["layer"] = self.layers
        if "precision" in rec:
            rec["precision"] = self.precision  # what ran: auto resolved for the device
        if "activation" in rec:  # what ran: auto resolved for the model; null for segmentation (pixel shares)
            rec["activation"] = None if self.activation is None else self.activation.value
        if "class" in rec:
            rec["class"] = [str(s) for s in self.specs if not isinstance(s, tgt.OUTPUT_SPECS)] or None
        rec.update(self._output_facts())
        return rec
