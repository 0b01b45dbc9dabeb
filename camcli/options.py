"""Every option of every command, declared once.

An :class:`Option` names its flags, type, default, help, validation, whether it shapes the outputs
and which commands take it. Everything else is derived from these declarations:

- the Typer parameters of each command (:func:`typer_parameters`),
- the keys of ``--config`` files and check files (:func:`read_file_options`),
- the typed options classes of the Python API (``ExplainOptions``, ...): frozen dataclasses whose
  fields carry their ``Option`` as metadata and hold values of their real type (lists are tuples,
  numbers are numbers, ``--precision`` a :class:`Precision`), converted once, at construction,
- the run fingerprint that ``--skip-existing`` compares (:func:`fingerprint`),
- the ``options`` record of summary.json (:func:`record`).

Adding an option is one entry in ``OPTIONS`` and one typed field on the classes of the commands that
take it; a test walks them and proves each reaches every command that lists it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

from camcli.boxes import Box, BoxError, parse_box
from camcli.errors import UsageError, suggest

EXPLAIN, EVALUATE, CHECK, LAYERS = "explain", "evaluate", "check", "layers"
COMMANDS = (EXPLAIN, EVALUATE, CHECK, LAYERS)
DEVICES = ("auto", "cpu", "cuda", "mps")


class Precision(StrEnum):
    """``--precision``: a str, so records, fingerprints and messages spell it as before."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    AUTO = "auto"


PRECISIONS = tuple(p.value for p in Precision)


class Activation(StrEnum):
    """``--activation``: how the model's outputs become the numbers records, top-k, check and
    evaluate read. ``auto`` is resolved once per session from the model (camcli/activation.py)."""

    AUTO = "auto"
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    NONE = "none"  # the raw output value (a regressor, or a logit read as it is)


ACTIVATIONS = tuple(a.value for a in Activation)
SCORES = ("logit", "probability")  # --score: what a class's map explains


class Kind(str, Enum):
    """The value types an option can have; each knows how to read itself from a file."""

    BOOL = "bool"
    INT = "int"
    FLOAT = "float"
    STR = "str"
    LIST = "list"  # comma-separated text, or a YAML list; repeatable on the command line; held as tuple[str, ...]
    INTS = "ints"  # a YAML list of integers, or comma-separated integers; held as tuple[int, ...]


@dataclass(frozen=True)
class Option:
    name: str  # attribute name, and the key in config and check files (``-`` or ``_`` accepted)
    flags: tuple[str, ...]  # long flag first; () for options that only files and the Python API set
    kind: Kind
    default: Any
    help: str
    commands: frozenset[str]
    shapes_output: bool = False  # changes the written maps or records: part of the run fingerprint
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None
    group: str = "run"  # "model": also accepted inside a check file's ``model:`` mapping
    file_key: str | None = None  # the key in files when it differs from ``name`` (``class``)
    in_files: bool = True  # accepted in --config and check files
    record: bool = True  # written to summary.json's ``options``
    example: Any = None  # a valid value other than the default (used by tests)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # per-command default overrides
    default_text: str | None = None  # how ``--help`` shows the default when it is computed
    flag_value: str | None = None  # the value of the flag given without one (``--ray``): its value is optional
    metavar: str | None = None  # how ``--help`` names the value
    parse: Callable[[Any], Any] | None = None  # text as given -> the typed value; ValueError: left for ``check``
    # False: left out of the fingerprint while unset (None), so runs made before the option existed
    # keep their fingerprints (--skip-existing reuses their outputs)
    fingerprint_unset: bool = True

    @property
    def key(self) -> str:
        return self.file_key or self.name

    @property
    def flag(self) -> str:
        return self.flags[0] if self.flags else self.key

    def default_for(self, command: str) -> Any:  # noqa: ANN401
        return self.defaults.get(command, self.default)

    def help_for(self, command: str) -> str:
        shown = self.default_text
        if shown is None:
            d = self.default_for(command)
            if isinstance(d, bool):
                shown = "on" if d else "off"
            elif d is not None:
                shown = str(d)
        return self.help + (f" (default: {shown})" if shown else "")


def _at_least(n: int | float) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or v >= n else f"must be at least {n}"


def _between(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or lo <= v <= hi else f"is out of range (accepted: {lo} to {hi})"


def _device(v: Any) -> str | None:  # noqa: ANN401
    if v in DEVICES or (isinstance(v, str) and v.startswith("cuda:") and v[5:].isdigit()):
        return None
    return f"is not one of {', '.join(DEVICES)} (or cuda:N)"


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"is not one of {', '.join(choices)}"


def _shard(v: Any) -> str | None:  # noqa: ANN401
    try:
        parse_shard(v)
    except UsageError as e:
        return str(e).split(": ", 1)[-1]
    return None


def parse_shard(spec: str) -> tuple[int, int]:
    """'K/N' with 1 <= K <= N -> (K, N)."""
    try:
        k_s, n_s = spec.split("/")
        k, n = int(k_s), int(n_s)
    except ValueError:
        raise UsageError(f"--shard {spec!r}: is not K/N (for example 2/8)") from None
    if not 1 <= k <= n:
        raise UsageError(f"--shard {spec!r}: K must be between 1 and N")
    return k, n


def _numbers(v: Any) -> tuple[float, ...]:  # noqa: ANN401
    """``--mean``/``--std`` as given ("0.5,0.5,0.5", or a sequence) -> numbers; ValueError if not."""
    parts = str(v).split(",") if isinstance(v, str) else list(v)
    return tuple(float(p) for p in parts)


def _triple(v: Any) -> str | None:  # noqa: ANN401
    ok = isinstance(v, tuple) and len(v) == 3 and all(isinstance(p, float) for p in v)
    return None if ok else "is not three numbers R,G,B (for example 0.5,0.5,0.5)"


def region_box(v: Any) -> Any:  # noqa: ANN401
    """``--region`` as typed ("x0,y0,x1,y1", "fraction:x0,y0,x1,y1") or a file's list or
    {fraction: [...]} -> a boxes.Box in its stated unit; BoxError (a ValueError) when it is none."""
    if isinstance(v, Box):
        return v
    if isinstance(v, str):
        return parse_box(v, plain_fractions=True, cli=True)
    return parse_box(v, plain_fractions=True)


def region_problem(v: Any) -> str | None:  # noqa: ANN401
    """What is wrong with a ``--region`` box, or None."""
    try:
        vals = region_box(v).values
    except BoxError as e:
        return f"is not a box x0,y0,x1,y1 in pixels or fraction:x0,y0,x1,y1 ({e})"
    if vals[2] <= vals[0] or vals[3] <= vals[1] or min(vals) < 0:
        return ("is not a box x0,y0,x1,y1 with x0 < x1 and y0 < y1 (pixels, or fractions written "
                "fraction:x0,y0,x1,y1)")
    return None


RAY_ADDRESSES = ("default", "auto", "local")


def _ray_address(v: Any) -> str | None:  # noqa: ANN401
    if v in RAY_ADDRESSES or "://" in str(v) or re.fullmatch(r"[\w.-]+:\d+", str(v)):
        return None
    if re.fullmatch(r"[\w.-]+:[^/\\]*", str(v)):
        return (f"is not a Ray address: the port {str(v).rpartition(':')[2]!r} is not a number "
                f"(accepted: {', '.join(RAY_ADDRESSES)}, HOST:PORT or ray://HOST:PORT)")
    return (f"is not a Ray address (accepted: {', '.join(RAY_ADDRESSES)}, HOST:PORT or ray://HOST:PORT); "
            "give --ray after the input paths, or write --ray=ADDRESS")


def _not_empty(v: Any) -> str | None:  # noqa: ANN401
    return "must not be empty" if isinstance(v, str) and not v.strip() else None


def _target(v: Any) -> str | None:  # noqa: ANN401
    """``--target``: module:function as text (Python callers may give the callable itself)."""
    if callable(v):
        return None
    if not isinstance(v, str) or not re.fullmatch(r"[\w.]+:[\w.]+", v.strip()):
        return "is not module:function (for example mypkg.targets:score)"
    return None


def names(v: Any) -> tuple[str, ...]:  # noqa: ANN401
    """A list option as given ("a,b", ["a", "b,c"], ("a",)) -> ("a", "b", "c"); the one place a comma
    is split. Empty items stay, for :func:`_items` to refuse."""
    parts = [v] if isinstance(v, (str, int)) else list(v)
    return tuple(p.strip() for part in parts for p in str(part).split(","))


def prompts(v: Any) -> tuple[str, ...]:  # noqa: ANN401
    """``--text`` as given ("a photo of a dog", ["red", "blue"]) -> a tuple of prompts. Never split on
    commas: a prompt is free text."""
    parts = [v] if isinstance(v, (str, int)) else list(v)
    return tuple(str(p).strip() for p in parts)


def _prompts(v: Any) -> str | None:  # noqa: ANN401
    if not isinstance(v, tuple) or not v or any(not p for p in v):
        return "has an empty prompt (give each prompt as its own --text)"
    if len(set(v)) != len(v):
        return "names a prompt twice (each prompt is one zero-shot class)"
    return None


def _ints(v: Any) -> tuple[int, ...]:  # noqa: ANN401
    """A list of integers as given ("10,50", [10, 50]) -> (10, 50); ValueError if not."""
    parts = v.split(",") if isinstance(v, str) else v
    if isinstance(parts, bool) or not isinstance(parts, (list, tuple)) or any(isinstance(p, bool) for p in parts):
        raise ValueError(v)
    return tuple(int(str(p).strip()) for p in parts)


def _items(v: Any) -> str | None:  # noqa: ANN401
    """List options: no empty item ('gradcam,' is a typo, not a request)."""
    if not isinstance(v, tuple) or not v or any(not p for p in v):
        return "has an empty item (write names separated by single commas)"
    return None


def _percentages(v: Any) -> str | None:  # noqa: ANN401
    ok = isinstance(v, tuple) and v and all(isinstance(p, int) and 0 < p < 100 for p in v)
    return None if ok else "must be percentages between 1 and 99"


_E, _V, _C, _L = EXPLAIN, EVALUATE, CHECK, LAYERS
_MAP = frozenset({_E, _V, _C})  # every command that computes maps

OPTIONS: tuple[Option, ...] = (
    # -- the model -----------------------------------------------------------------------------
    Option("model", ("--model", "-m"), Kind.STR, None,
           "Bundled 'efficientnet-lite0', a torchvision/timm architecture name, a model file, or module:callable.",
           frozenset({_E, _V, _C, _L}), shapes_output=True, group="model", default_text="efficientnet-lite0",
           example="toymodels:tiny_cnn"),
    Option("weights", ("--weights", "-w"), Kind.STR, None,
           "State dict or checkpoint file for --model; 'random' for untrained.",
           frozenset({_E, _V, _C, _L}), shapes_output=True, group="model", example="random"),
    Option("labels", ("--labels",), Kind.STR, None,
           "Class names: .txt (one per line) or .json. ImageNet is built in.",
           frozenset({_E, _V, _C}), shapes_output=True, group="model", example="labels.txt"),
    Option("unsafe_load", ("--unsafe-load",), Kind.BOOL, False,
           "Allow pickled code in checkpoints (weights_only=False); only for files you trust.",
           frozenset({_E, _V, _C, _L}), group="model", example=True),
    Option("output_key", ("--output-key",), Kind.STR, None,
           "Which item of a tuple/dict model output holds the logits (a key or a position).",
           frozenset({_E, _V, _C}), shapes_output=True, group="model", example="logits"),
    Option("image_size", ("--image-size",), Kind.INT, None,
           "Model input size: the shorter side (flexible models) or the fixed square side.",
           frozenset({_E, _V, _C, _L}), shapes_output=True, check=_at_least(16), group="model",
           default_text="the model's own", example=96),
    Option("mean", ("--mean",), Kind.STR, None,
           "Normalisation mean, three numbers R,G,B (0..1), replacing the model's own.",
           frozenset({_E, _V, _C}), shapes_output=True, group="model", check=_triple, default_text="the model's own",
           example="0.5,0.5,0.5", parse=_numbers),
    Option("std", ("--std",), Kind.STR, None,
           "Normalisation std, three numbers R,G,B, replacing the model's own.",
           frozenset({_E, _V, _C}), shapes_output=True, group="model", check=_triple, default_text="the model's own",
           example="0.25,0.25,0.25", parse=_numbers),
    Option("layout", ("--layout",), Kind.STR, None,
           "How the layer's output lies on the image: nchw, nhwc or tokens:P (P prefix tokens).",
           frozenset({_E, _V, _C, _L}), shapes_output=True, check=_not_empty, default_text="found from the model",
           example="nchw"),
    Option("device", ("--device",), Kind.STR, "auto", "auto, cpu, cuda, cuda:N or mps.",
           frozenset({_E, _V, _C}), check=_device, example="cpu"),
    Option("max_pixels", ("--max-pixels",), Kind.INT, 178_956_970,
           "Largest image to decode, in pixels (width x height); a larger one is that image's error.",
           _MAP, check=_at_least(1), example=10_000_000),
    Option("precision", ("--precision",), Kind.STR, "fp32",
           "Forward pass: fp32, bf16 (autocast on CUDA and CPU), fp16 (CUDA only), or auto (bf16 on a CUDA "
           "device that supports it, else fp32). Maps are always computed in fp32.",
           _MAP, shapes_output=True, check=_one_of(PRECISIONS), example="bf16", parse=Precision),
    # Not part of the options' fingerprint as given: Session.shaping adds the resolved activation as a
    # resolved fact when it is not softmax, so every softmax run keeps the fingerprint it had before.
    Option("activation", ("--activation",), Kind.STR, "auto",
           "How outputs become probabilities (records, top-k, check, evaluate): softmax, sigmoid, none (the raw "
           "value), or auto (found from the model: see the README's 'Output activation').",
           _MAP, group="model", check=_one_of(ACTIVATIONS), example="sigmoid", parse=Activation),
    # -- what to explain -----------------------------------------------------------------------
    Option("method", ("--method", "-M"), Kind.LIST, "gradcam",
           "Comma-separated methods (see `camcli methods`), or all: every method that fits the model.", _MAP, shapes_output=True, check=_items,
           example="layercam"),
    Option("layer", ("--layer", "-l"), Kind.LIST, None,
           "Dotted module path(s), comma-separated.", _MAP, shapes_output=True, check=_items,
           default_text="last spatial layer", example="features.0"),
    Option("per_layer", ("--per-layer",), Kind.BOOL, False, "With several layers, also write each layer's map.",
           frozenset({_E}), shapes_output=True, example=True),
    Option("classes", ("--class", "-c"), Kind.LIST, None,
           "top1, topK, a class index or a label, not:CLASS (what lowers it), above:T (every class above "
           "probability T); repeatable or comma-separated (evaluate and check: one per image).",
           frozenset({_E, _V}), shapes_output=True, file_key="class", check=_items, default_text="top1",
           example="1"),
    Option("region", ("--region",), Kind.STR, None,
           "Segmentation models: explain the class's score summed over this box x0,y0,x1,y1 in pixels, or "
           "fraction:x0,y0,x1,y1 (fractions of the image).",
           _MAP, shapes_output=True, check=region_problem, default_text="the pixels the model assigns to the class",
           example="fraction:0,0,0.5,0.5", parse=region_box),
    Option("region_mask", ("--region-mask",), Kind.STR, None,
           "Segmentation models: explain the class's score summed over this mask image's non-zero pixels.",
           _MAP, shapes_output=True, check=_not_empty, example="mask.png"),
    Option("reference", ("--reference",), Kind.STR, None,
           "Explain the cosine similarity of the model's output (an embedding) to this image's, computed "
           "once by the same model; for models without class logits. Not with --class.",
           frozenset({_E, _V, _C}), shapes_output=True, check=_not_empty, metavar="IMAGE", example="reference.png",
           fingerprint_unset=False),
    Option("score", ("--score",), Kind.STR, None,
           "What a class's map explains: logit (its raw output y^c, as Grad-CAM) or probability (its value "
           "under --activation: softmax, pytorch-grad-cam's ClassifierOutputSoftmaxTarget; sigmoid, one "
           "label of a multi-label model).",
           frozenset({_E, _C}), shapes_output=True, check=_one_of(SCORES), default_text="logit",
           example="probability", fingerprint_unset=False),
    Option("target", ("--target",), Kind.STR, None,
           "Explain what module:function returns: the model output (batch first) -> one scalar per image "
           "(Python: any callable). Not with --class.",
           frozenset({_E, _V, _C}), shapes_output=True, check=_target, metavar="MODULE:FUNCTION",
           example="toymodels:second_minus_first", fingerprint_unset=False),
    Option("text", ("--text",), Kind.LIST, None,
           "CLIP-style models: explain the image's similarity to this text prompt (logit_scale x cosine, as "
           "CLIP's logits); repeatable: several prompts are zero-shot classes (softmax over the prompts) that "
           "--class picks from.",
           frozenset({_E, _V, _C}), shapes_output=True, check=_prompts, metavar="PROMPT", example="red",
           fingerprint_unset=False, parse=prompts),
    # -- how maps are computed -----------------------------------------------------------------
    Option("batch_size", ("--batch-size", "-b"), Kind.INT, 8, "Images per forward pass.", _MAP,
           check=_at_least(1), example=3),
    Option("signed", ("--signed",), Kind.BOOL, False, "Keep negative evidence (no ReLU); diverging colours.",
           _MAP, shapes_output=True, example=True),
    Option("aug_smooth", ("--aug-smooth",), Kind.BOOL, False,
           "Average maps over flips and rescales (4 passes).", _MAP, shapes_output=True, example=True),
    Option("eigen_smooth", ("--eigen-smooth",), Kind.BOOL, False,
           "First principal component of the weighted activations instead of their sum.", _MAP,
           shapes_output=True, example=True),
    Option("score_channels", ("--score-channels",), Kind.INT, None,
           "Score-CAM family and Ablation-CAM: use the N channels with most activation.", _MAP,
           shapes_output=True, check=_at_least(1), default_text="all", example=4),
    Option("perturbation_batch", ("--perturbation-batch",), Kind.INT, 16,
           "Masked inputs per forward pass (perturbation methods, evaluate's metrics).", _MAP,
           shapes_output=True, check=_at_least(1), example=5),
    Option("channels", ("--channels",), Kind.STR, "mean", "`activations` method: mean, a channel index, or topN.",
           _MAP, shapes_output=True, check=_not_empty, example="top2"),
    Option("samples", ("--samples",), Kind.INT, 8,
           "ss-cam / smoothgradcam++ noise samples; is-cam integration steps.", _MAP, shapes_output=True,
           check=_at_least(1), example=3),
    Option("noise", ("--noise",), Kind.FLOAT, 0.1,
           "ss-cam / smoothgradcam++ noise std, share of the input range.", _MAP, shapes_output=True,
           check=_between(0.0, 10.0), example=0.3),
    Option("finer_base", ("--finer-base",), Kind.STR, "gradcam", "finercam: the class-specific method it contrasts.",
           _MAP, shapes_output=True, check=_not_empty, example="layercam"),
    Option("finer_alpha", ("--finer-alpha",), Kind.FLOAT, 0.6,
           "finercam: weight of the most similar classes' mean score.", _MAP, shapes_output=True,
           check=_between(0.0, 10.0), example=1.0),
    Option("finer_references", ("--finer-references",), Kind.INT, 3,
           "finercam: how many of the most similar classes to contrast with.", _MAP, shapes_output=True,
           check=_at_least(1), example=1),
    Option("discard_ratio", ("--discard-ratio",), Kind.FLOAT, 0.0,
           "attention-rollout: share of each block's lowest head-mean attention weights set to 0 (vit-explain: 0.9).",
           _MAP, shapes_output=True, check=_between(0.0, 0.99), example=0.9),
    # The black-box methods' options are unset (None) by default, so runs of other methods keep their
    # fingerprints; a run of occlusion or rise adds the values it used as resolved facts
    # (MethodInfo.reads, Session.shaping).
    Option("occlusion_window", ("--occlusion-window",), Kind.INT, None,
           "occlusion: side of the square patch, in model-input pixels.", _MAP, shapes_output=True,
           check=_at_least(1), default_text="16", example=8, fingerprint_unset=False),
    Option("occlusion_stride", ("--occlusion-stride",), Kind.INT, None,
           "occlusion: step between patch positions, in model-input pixels (at most the window).", _MAP,
           shapes_output=True, check=_at_least(1), default_text="8", example=4, fingerprint_unset=False),
    Option("occlusion_fill", ("--occlusion-fill",), Kind.FLOAT, None,
           "occlusion: value written into the patch, in the normalised input (0: the dataset mean colour).",
           _MAP, shapes_output=True, default_text="0", example=-1.0, fingerprint_unset=False),
    Option("rise_masks", ("--rise-masks",), Kind.INT, None,
           "rise: number of random masks (one forward pass each; the paper uses 4000 to 8000).", _MAP,
           shapes_output=True, check=_at_least(1), default_text="1000", example=64, fingerprint_unset=False),
    Option("rise_grid", ("--rise-grid",), Kind.INT, None,
           "rise: cells per side of the random grid each mask is upsampled from.", _MAP, shapes_output=True,
           check=_at_least(1), default_text="7", example=4, fingerprint_unset=False),
    Option("rise_keep", ("--rise-keep",), Kind.FLOAT, None,
           "rise: probability that a grid cell is kept (left visible).", _MAP, shapes_output=True,
           check=lambda v: None if v is None or 0 < v <= 1 else "is out of range (accepted: above 0, up to 1)",
           default_text="0.5", example=0.3, fingerprint_unset=False),
    Option("seed", ("--seed",), Kind.INT, 0,
           "Seed for noise (ss-cam, smoothgradcam++; rise's masks; evaluate's ROAD noise, random baseline, "
           "re-initialisation).",
           _MAP, shapes_output=True, example=7),
    # -- explain: inputs and outputs -----------------------------------------------------------
    Option("out", ("--out", "-o"), Kind.STR, "camcli-out", "Output folder.", frozenset({_E, _V}),
           check=_not_empty, defaults={_V: "camcli-eval"}, example="elsewhere"),
    Option("recursive", ("--recursive", "-r"), Kind.BOOL, False, "Descend into subfolders.",
           frozenset({_E, _V}), example=True),
    Option("workers", ("--workers",), Kind.INT, None, "Decoding worker processes (0: main process; at most the available cores).",
           frozenset({_E}), check=_at_least(0), default_text="0 on <= 2 cores, else up to 4", example=0),
    Option("alpha", ("--alpha",), Kind.FLOAT, 0.5, "Heatmap opacity, 0..1.", frozenset({_E}),
           shapes_output=True, check=_between(0.0, 1.0), example=0.7),
    Option("colormap", ("--colormap",), Kind.STR, None, "Any OpenCV colormap name, or diverging.",
           frozenset({_E}), shapes_output=True, default_text="jet; diverging with --signed", example="viridis"),
    Option("save_raw", ("--save-raw",), Kind.BOOL, False, "Also write float32 .npy maps at full resolution.",
           frozenset({_E}), shapes_output=True, example=True),
    Option("skip_existing", ("--skip-existing",), Kind.BOOL, False,
           "Skip images whose outputs a previous run with the same options completed.", frozenset({_E}),
           example=True),
    Option("shard", ("--shard",), Kind.STR, None, "K/N: process a deterministic 1/N of the inputs (job arrays).",
           frozenset({_E}), check=_shard, example="1/2"),
    Option("fail_fast", ("--fail-fast",), Kind.BOOL, False, "Stop at the first image that fails.",
           frozenset({_E}), example=True),
    Option("ray", ("--ray",), Kind.STR, None,
           "Run on Ray Data: --ray alone uses RAY_ADDRESS, a cluster running here, or a new local one; "
           "or auto, HOST:PORT, ray://HOST:PORT. Needs pip install 'camcli[ray]'.",
           frozenset({_E}), check=_ray_address, flag_value="default", metavar="[ADDRESS]", default_text="off",
           example="auto"),
    Option("ray_timeout", ("--ray-timeout",), Kind.FLOAT, 60.0,
           "Seconds --ray waits for the cluster at its address to answer before giving up (exit 2).",
           frozenset({_E}), check=lambda v: None if v is None or v > 0 else "must be greater than 0 seconds",
           example=5.0),
    # -- evaluate -----------------------------------------------------------------------------
    Option("metric", ("--metric",), Kind.LIST, None,
           "Comma-separated metrics (box metrics need --boxes).", frozenset({_V}), check=_items,
           default_text="all", example="complexity"),
    Option("boxes", ("--boxes",), Kind.STR, None,
           "JSON/YAML map from image to boxes [x0, y0, x1, y1] in pixels.", frozenset({_V})),
    Option("steps", ("--steps",), Kind.INT, 100, "Deletion/insertion curve steps.", frozenset({_V}),
           check=_at_least(2), example=5),
    Option("plots", ("--plots",), Kind.BOOL, False, "Also write deletion/insertion curve PNGs.",
           frozenset({_V}), example=True),
    Option("road_percentages", (), Kind.INTS, (10, 20, 30, 40, 50, 60, 70, 80, 90),
           "ROAD: percentages of pixels removed.", frozenset({_V}), check=_percentages, example=[10, 50]),
    # -- behaviour of the command itself (not in files, not recorded) ---------------------------
    Option("quiet", ("--quiet", "-q"), Kind.BOOL, False, "No progress bar, messages or warnings on stderr.",
           frozenset({_E, _V, _C}), in_files=False, record=False, example=True),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def options_for(command: str) -> list[Option]:
    return [o for o in OPTIONS if command in o.commands]


def typed(o: Option, value: Any) -> Any:  # noqa: ANN401
    """A value as given (text from a flag, YAML, or a Python value) -> its real type: lists are
    tuples, numbers numbers, enums enums. A value that does not convert stays as given, for the
    option's ``check`` to name."""
    if value is None:
        return None
    parse = o.parse or {Kind.LIST: names, Kind.INTS: _ints}.get(o.kind)
    if parse is None:
        return value
    try:
        return parse(value)
    except (ValueError, TypeError):
        return value


def _json(value: Any) -> str:  # noqa: ANN401
    return json.dumps(value, sort_keys=True, default=str)


# -- options objects -----------------------------------------------------------------------------
def _field(name: str, command: str | None = None) -> Any:  # noqa: ANN401
    """A dataclass field for a declared option: its default, and the ``Option`` as metadata."""
    o = BY_NAME[name]
    return dataclasses.field(default=o.default if command is None else o.default_for(command), metadata={"option": o})


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """What loads and inspects a model: every options class starts here (and `camcli layers` has no more)."""

    COMMAND: ClassVar[str] = LAYERS

    model: str | None = _field("model")
    weights: str | None = _field("weights")
    unsafe_load: bool = _field("unsafe_load")
    image_size: int | None = _field("image_size")
    layout: str | None = _field("layout")
    # Values as they were given where that differs from their typed form as JSON ("gradcam,layercam" for
    # ("gradcam", "layercam")): summary.json's options and the fingerprint keep that spelling, so both
    # stay what they were before options were typed, and --skip-existing reuses older runs' outputs.
    as_given: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        given = dict(self.as_given)
        for o in options_for(self.COMMAND):
            raw = getattr(self, o.name)
            value = typed(o, raw)
            object.__setattr__(self, o.name, value)
            if o.name in given and _json(typed(o, given[o.name])) == _json(value):
                continue  # still the value that spelling gave (a copy by dataclasses.replace)
            given.pop(o.name, None)
            if _json(raw) != _json(value):
                given[o.name] = raw
        object.__setattr__(self, "as_given", given)

    def spelled(self, name: str) -> Any:  # noqa: ANN401
        """An option's value as it was given: what records and fingerprints show."""
        return self.as_given.get(name, getattr(self, name))

    def validate(self) -> None:
        """Check every value against its declaration: UsageError naming the flag and the value."""
        for o in options_for(self.COMMAND):
            value = getattr(self, o.name)
            problem = o.check(value) if (o.check is not None and value is not None) else None
            if problem:
                raise UsageError(f"{o.flag} {self.spelled(o.name)!r} {problem}")


@dataclass(frozen=True, kw_only=True)
class LayersOptions(ModelOptions):
    """Every option of `camcli layers`."""

    COMMAND: ClassVar[str] = LAYERS


@dataclass(frozen=True, kw_only=True)
class MapOptions(ModelOptions):
    """What every command that computes maps takes: what a Session opens from."""

    COMMAND: ClassVar[str] = CHECK

    labels: str | None = _field("labels")
    output_key: str | None = _field("output_key")
    mean: tuple[float, ...] | None = _field("mean")
    std: tuple[float, ...] | None = _field("std")
    device: str = _field("device")
    max_pixels: int = _field("max_pixels")
    precision: Precision = _field("precision")
    activation: Activation = _field("activation")
    method: tuple[str, ...] = _field("method")
    layer: tuple[str, ...] | None = _field("layer")
    region: Box | None = _field("region")  # camcli.boxes.Box: values in a stated unit
    region_mask: str | None = _field("region_mask")
    batch_size: int = _field("batch_size")
    signed: bool = _field("signed")
    aug_smooth: bool = _field("aug_smooth")
    eigen_smooth: bool = _field("eigen_smooth")
    score_channels: int | None = _field("score_channels")
    perturbation_batch: int = _field("perturbation_batch")
    channels: str = _field("channels")
    samples: int = _field("samples")
    noise: float = _field("noise")
    finer_base: str = _field("finer_base")
    finer_alpha: float = _field("finer_alpha")
    finer_references: int = _field("finer_references")
    discard_ratio: float = _field("discard_ratio")
    occlusion_window: int | None = _field("occlusion_window")
    occlusion_stride: int | None = _field("occlusion_stride")
    occlusion_fill: float | None = _field("occlusion_fill")
    rise_masks: int | None = _field("rise_masks")
    rise_grid: int | None = _field("rise_grid")
    rise_keep: float | None = _field("rise_keep")
    seed: int = _field("seed")
    quiet: bool = _field("quiet")


@dataclass(frozen=True, kw_only=True)
class CheckOptions(MapOptions):
    """The options a check file sets (top level or under model:)."""

    COMMAND: ClassVar[str] = CHECK

    reference: str | None = _field("reference")
    score: str | None = _field("score")
    target: str | Callable[[Any], Any] | None = _field("target")
    text: tuple[str, ...] | None = _field("text")


@dataclass(frozen=True, kw_only=True)
class ImagesOptions(MapOptions):
    """The commands that read images from paths and write to a folder: explain and evaluate."""

    classes: tuple[str, ...] | None = _field("classes")
    out: str = _field("out")
    recursive: bool = _field("recursive")


@dataclass(frozen=True, kw_only=True)
class ExplainOptions(ImagesOptions):
    """Every option of `camcli explain`, as declared in OPTIONS."""

    COMMAND: ClassVar[str] = EXPLAIN

    per_layer: bool = _field("per_layer")
    reference: str | None = _field("reference")
    score: str | None = _field("score")
    target: str | Callable[[Any], Any] | None = _field("target")
    text: tuple[str, ...] | None = _field("text")
    workers: int | None = _field("workers")
    alpha: float = _field("alpha")
    colormap: str | None = _field("colormap")
    save_raw: bool = _field("save_raw")
    skip_existing: bool = _field("skip_existing")
    shard: str | None = _field("shard")
    fail_fast: bool = _field("fail_fast")
    ray: str | None = _field("ray")
    ray_timeout: float = _field("ray_timeout")


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions(ImagesOptions):
    """Every option of `camcli evaluate`."""

    COMMAND: ClassVar[str] = EVALUATE

    out: str = _field("out", EVALUATE)
    reference: str | None = _field("reference")
    target: str | Callable[[Any], Any] | None = _field("target")
    text: tuple[str, ...] | None = _field("text")
    metric: tuple[str, ...] | None = _field("metric")
    boxes: str | None = _field("boxes")
    steps: int = _field("steps")
    plots: bool = _field("plots")
    road_percentages: tuple[int, ...] = _field("road_percentages")


OPTIONS_CLASS: dict[str, type[ModelOptions]] = {
    EXPLAIN: ExplainOptions, EVALUATE: EvaluateOptions, CHECK: CheckOptions, LAYERS: LayersOptions,
}


def declared_fields(cls: type[ModelOptions]) -> dict[str, Option]:
    """The fields of an options class that carry an ``Option``, by name."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(cls) if "option" in f.metadata}


def build(command: str, *layers: Mapping[str, Any]) -> Any:  # noqa: ANN401
    """Defaults < each mapping in turn (None: not given) -> a validated options object."""
    values: dict[str, Any] = {}
    for layer in layers:
        values.update({k: v for k, v in layer.items() if v is not None})
    opts = OPTIONS_CLASS[command](**values)
    opts.validate()
    return opts


def record(opts: ModelOptions) -> dict[str, Any]:
    """The options as summary.json records them: every recorded option of the command, as given."""
    return {o.key: opts.spelled(o.name) for o in options_for(opts.COMMAND) if o.record}


def shaping(opts: ModelOptions, **resolved: Any) -> dict[str, Any]:  # noqa: ANN401
    """Everything that shapes the outputs, as JSON values: declared options plus resolved facts
    (the model's weights hash, the layers and classes actually used). Records headers keep it, so
    `camcli merge` can name the option in which two shards differ."""
    values = {o.name: opts.spelled(o.name) for o in options_for(opts.COMMAND)
              if o.shapes_output and (o.fingerprint_unset or opts.spelled(o.name) is not None)}
    values.update(resolved)
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def digest(shaping_values: Mapping[str, Any]) -> str:
    """The fingerprint of a :func:`shaping` mapping: a short hash."""
    return hashlib.sha256(json.dumps(shaping_values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(opts: ModelOptions, **resolved: Any) -> str:  # noqa: ANN401
    """A short hash of everything that shapes the outputs (see :func:`shaping`)."""
    return digest(shaping(opts, **resolved))


# -- files ---------------------------------------------------------------------------------------
def _file_value(o: Option, value: Any, where: str) -> Any:  # noqa: ANN401
    """A value from YAML, type-checked against the declaration."""
    if value is None:
        return None
    bad = None
    if o.kind is Kind.BOOL:
        if not isinstance(value, bool):
            bad = "must be true or false"
    elif o.kind is Kind.INT:
        if isinstance(value, bool) or not isinstance(value, int):
            bad = "must be an integer"
    elif o.kind is Kind.FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad = "must be a number"
        else:
            value = float(value)
    elif o.kind is Kind.INTS:
        try:
            value = _ints(value)
        except (ValueError, TypeError):
            bad = "must be a list of integers"
    elif o.kind is Kind.LIST:
        if isinstance(value, list):
            if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
                bad = "must be a list of names"
            else:
                value = [str(v) for v in value]
        elif isinstance(value, (str, int)) and not isinstance(value, bool):
            value = str(value)
        else:
            bad = "must be a name or a list of names"
    else:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        elif not isinstance(value, str):
            bad = "must be a string"
    if bad:
        raise UsageError(f"{where}: {o.key} {bad}, got {value!r}")
    if o.check is not None:
        problem = o.check(typed(o, value))
        if problem:
            raise UsageError(f"{where}: {o.key} {value!r} {problem}")
    return value


def file_keys(command: str, group: str | None = None) -> dict[str, Option]:
    """Accepted file keys (with underscores) -> option; ``group`` limits them to one group."""
    return {o.key: o for o in options_for(command) if o.in_files and (group is None or o.group == group)}


def read_file_options(
    data: Mapping[Any, Any], command: str, where: str, *, group: str | None = None, ignore: Iterable[str] = ()
) -> dict[str, Any]:
    """Option values from a mapping read from a file; unknown keys and wrong types are usage errors.

    Keys may use ``-`` or ``_``. ``ignore`` lists keys the caller handles itself (a check file's
    ``cases``). ``where`` names the file (and section) in messages.
    """
    accepted = file_keys(command, group)
    skip = set(ignore)
    out: dict[str, Any] = {}
    for raw, value in data.items():
        k = str(raw).strip().replace("-", "_")
        if k in skip:
            continue
        o = accepted.get(k)
        if o is None:
            names = sorted([*(a.replace("_", "-") for a in accepted), *skip])
            raise UsageError(
                f"{where}: unknown key {raw!r}{suggest(k.replace('_', '-'), names) or ''} (accepted: {', '.join(names)})"
            )
        out[o.name] = _file_value(o, value, where)
    return out


def read_config(path: str | Path, command: str = EXPLAIN) -> dict[str, Any]:
    """A ``--config`` YAML file: the command's options as keys; flags on the command line win."""
    from camcli.config import read_yaml

    p = Path(path)
    where = f"--config {str(p)!r}"
    data = read_yaml(p, where)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping of option: value, got {type(data).__name__}")
    return read_file_options(data, command, where)


# -- the command line -----------------------------------------------------------------------------
def typer_parameters(command: str) -> list[Any]:
    """inspect.Parameters, one per declared flag of ``command``; every default is None (not given)."""
    import inspect
    from typing import Annotated, Optional

    import typer

    py = {Kind.BOOL: bool, Kind.INT: int, Kind.FLOAT: float, Kind.STR: str, Kind.LIST: str}
    params = []
    for o in options_for(command):
        if not o.flags:
            continue
        decls = list(o.flags)
        if o.kind is Kind.BOOL and o.name != "quiet":
            long = decls[0]
            decls[0] = f"{long}/--no-{long[2:]}"
        typ: Any = py[o.kind]
        if o.name in ("classes", "text"):
            typ = list[str]  # repeatable
        info = typer.Option(*decls, help=o.help_for(command), show_default=False, metavar=o.metavar)
        params.append(
            inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=Annotated[Optional[typ], info])
        )
    return params


def _meant_as_value(word: str) -> bool:
    """A word after an optional-value flag that is no existing path and reads HOST:SOMETHING (``--ray
    nosuch:xx``) is the flag's value gone wrong, not an input: its check then says what is wrong."""
    return re.fullmatch(r"[\w.-]+:[^/\\]*", word) is not None and not os.path.lexists(word)


def fill_flag_values(command: str, args: Sequence[str]) -> list[str]:
    """Options whose value is optional (``--ray`` or ``--ray ADDRESS``): a flag that is not followed
    by a value the option accepts becomes ``--flag=<flag_value>``, so the next word stays an input."""
    optional = {f: o for o in options_for(command) if o.flag_value is not None for f in o.flags}
    out: list[str] = []
    for i, a in enumerate(args):
        if a == "--":
            out.extend(args[i:])
            break
        o = optional.get(a)
        nxt = args[i + 1] if i + 1 < len(args) else None
        if o is not None and (nxt is None or (o.check is not None and o.check(nxt) is not None
                                              and not _meant_as_value(nxt))):
            out.append(f"{a}={o.flag_value}")
        else:
            out.append(a)
    return out


def command_flags(command: str) -> set[str]:
    """Every flag spelling ``command`` accepts from the declarations (``--signed``, ``--no-signed``, ``-M``)."""
    out: set[str] = set()
    for o in options_for(command):
        out.update(o.flags)
        if o.kind is Kind.BOOL and o.flags and o.name != "quiet":
            out.add(f"--no-{o.flags[0][2:]}")
    return out
