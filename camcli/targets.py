"""What to explain: ``--class`` values parsed into target specs, resolved per batch into targets.

A *spec* is what the user asked for (``top3``, class 285). A *target* is what the engine explains
for one slot of a batch: for each image a class (for labels and probabilities, -1 where this slot
has nothing to explain) and a function that turns the model output into the scalar whose maps are
taken. The engine never indexes logits itself, so new kinds of target (a contrast between classes,
a segmentation region) are new classes here, not changes to the engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from camcli.activation import probabilities
from camcli.boxes import Box
from camcli.errors import UsageError, suggest
from camcli.options import Activation, region_box, region_problem


@dataclass(frozen=True)
class TopK:
    k: int

    def __str__(self) -> str:
        return f"top{self.k}"


@dataclass(frozen=True)
class ClassIndex:
    index: int

    def __str__(self) -> str:
        return str(self.index)


@dataclass(frozen=True)
class Not:
    """``not:K``: what lowers class K's output, -y^K (Grad-CAM's counterfactual explanation; for a
    one-output model, "what makes it say no")."""

    index: int

    def __str__(self) -> str:
        return f"not:{self.index}"


@dataclass(frozen=True)
class Above:
    """``above:T``: every class whose value under the activation (probability, or pixel share for
    segmentation) is above T, per image: a multi-label model's positive labels."""

    threshold: float

    def __str__(self) -> str:
        return f"above:{self.threshold:g}"


@dataclass(frozen=True)
class Reference:
    """``--reference IMAGE``: the cosine similarity of each image's output to the reference image's,
    its embedding computed once per run by the same model and preprocessing (Session.open)."""

    path: str
    sha256: str
    embedding: Tensor = field(compare=False, repr=False)  # (D,) float32: the reference's output, flattened

    def __str__(self) -> str:
        return "reference"

    def target(self, classes: Tensor) -> Target:
        return SimilarityTarget(classes, self.embedding, self.path)


@dataclass(frozen=True)
class Custom:
    """``--target module:function`` or a callable from Python: model output (N, ...) -> (N,)."""

    fn: Callable[[Tensor], Tensor] = field(compare=False, repr=False)
    name: str  # module:function as given, or the callable's module:qualname

    def __str__(self) -> str:
        return "callable"

    def target(self, classes: Tensor) -> Target:
        return CallableTarget(classes, self.fn, self.name)


@dataclass(frozen=True)
class Text:
    """``--text PROMPT`` (one prompt) on a CLIP-style model: logit_scale * cos(image, text), the model's
    one output once the prompt is set (camcli/models/clip.py; encoded once per run, in Session.open)."""

    prompt: str

    def __str__(self) -> str:
        return "text"

    def target(self, classes: Tensor) -> Target:
        return TextTarget(classes, self.prompt)


TargetSpec = TopK | ClassIndex | Not | Above | Reference | Custom | Text
OUTPUT_SPECS = (Reference, Custom, Text)  # specs that explain a scalar of the whole output, not a class


def callable_name(fn: Callable[..., object]) -> str:
    """A callable's module:qualname, as records and the fingerprint name it."""
    return f"{getattr(fn, '__module__', None) or '?'}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def parse_class_specs(
    values: Sequence[str | int] | None,
    labels: Sequence[str] | None,
    num_classes: int,
) -> list[TargetSpec]:
    """Parse ``--class`` items: ``top1``, ``top5``, ``285``, ``"Egyptian cat"``, ``not:285`` (what
    lowers it), ``above:0.5`` (every class above a probability) (None: top1).

    Raises UsageError naming the bad value and what is accepted.
    """
    tokens = ["top1"] if values is None else [str(v).strip() for v in values]
    if not tokens or not all(tokens):
        raise UsageError("--class is empty (accepted: top1, topK, a class index or a label name, not:CLASS, above:T)")
    specs: list[TargetSpec] = []
    lowered = {lab.lower(): i for i, lab in enumerate(labels or [])}
    for tok in tokens:
        m = re.fullmatch(r"top(\d+)", tok.lower())
        if m:
            k = int(m.group(1))
            if not 1 <= k <= num_classes:
                raise UsageError(f"--class {tok!r}: k must be between 1 and {num_classes}")
            spec: TargetSpec = TopK(k)
        elif tok.lower().startswith("above:"):
            spec = Above(_threshold(tok))
        elif tok.lower().startswith("not:"):
            spec = Not(_class_index(tok[4:].strip(), labels, lowered, num_classes, shown=tok))
        else:
            spec = ClassIndex(_class_index(tok, labels, lowered, num_classes))
        if spec not in specs:
            specs.append(spec)
    return specs


def _threshold(tok: str) -> float:
    text = tok.split(":", 1)[1].strip()
    try:
        t = float(text)
    except ValueError:
        t = float("nan")
    if not 0.0 < t < 1.0:  # also NaN
        raise UsageError(f"--class {tok!r}: the threshold must be a number between 0 and 1, such as above:0.5")
    return t


def _class_index(tok: str, labels: Sequence[str] | None, lowered: dict[str, int], num_classes: int,
                 shown: str | None = None) -> int:
    """A class given by index or label name (``not:`` stripped; ``shown``: the value as given, for errors)."""
    if re.fullmatch(r"-?\d+", tok):
        idx = int(tok)
        if not 0 <= idx < num_classes:
            what = idx if shown is None else repr(shown)
            raise UsageError(
                f"--class {what} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
            )
        return idx
    if tok.lower() in lowered:
        return lowered[tok.lower()]
    hint = ""
    if labels:
        hint = suggest(tok.lower(), lowered)
        for low, i in lowered.items():
            hint = hint.replace(f"'{low}'", f"'{labels[i]}'")
    accepted = "top1, topK, a class index" + (", or a label name" if labels else "") + ", not:CLASS, above:T"
    raise UsageError(
        f"unknown class {tok!r}{hint} (accepted: {accepted}"
        + ("" if labels else "; this model has no labels, pass --labels FILE")
        + ")"
    )


class Target(Protocol):
    """One slot of a batch: a class per image (-1: skip) and the scalar to explain."""

    classes: Tensor  # (B,) long

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        """``output`` (N, ...) from the model; ``rows`` (N,) the batch image each row belongs to -> (N,)."""
        ...


@dataclass
class ClassTarget:
    """The logit of a class: y^c; or with ``through`` (--score probability) its value under that
    activation: softmax(y)_c (pytorch-grad-cam's ClassifierOutputSoftmaxTarget), sigmoid(y^c), or y^c
    for none. Rows whose class is -1 score the class 0 (their maps are dropped)."""

    classes: Tensor
    through: Activation | None = None

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        c = self.classes.clamp(min=0).to(output.device)[rows.to(output.device)]
        values = output if self.through is None else probabilities(output, self.through)
        return values.gather(1, c[:, None])[:, 0]


@dataclass
class NotTarget:
    """``not:K``: minus the logit of a class, -y^c, whose gradients point at what lowers it."""

    classes: Tensor

    @property
    def about(self) -> dict[str, object]:
        return {"kind": "not", "index": int(self.classes.flatten()[0]) if self.classes.numel() else None}

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        return -ClassTarget(self.classes).score(output, rows)


@dataclass
class ContrastTarget:
    """Finer-CAM's contrast: y^c - alpha * mean of the reference classes' scores (Zhang et al. 2025)."""

    classes: Tensor  # (B,)
    references: Tensor  # (B, R) class indices
    alpha: float

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        rows = rows.to(output.device)
        c = self.classes.clamp(min=0).to(output.device)[rows]
        refs = self.references.to(output.device)[rows]
        return output.gather(1, c[:, None])[:, 0] - self.alpha * output.gather(1, refs).mean(dim=1)


@dataclass
class SimilarityTarget:
    """Cosine similarity of each row's output (flattened) to a reference embedding, as pytorch-grad-cam's
    ``SimilarityToConceptTarget``: cos(output[i], reference). ``classes`` are 0: every image has a map."""

    classes: Tensor
    embedding: Tensor  # (D,)
    reference: str

    @property
    def about(self) -> dict[str, object]:
        return {"kind": "reference", "reference": self.reference}

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        flat = output.flatten(1).float()
        if flat.shape[1] != self.embedding.numel():
            raise UsageError(
                f"--reference {self.reference!r}: the model output has {flat.shape[1]} values per image, the "
                f"reference's {self.embedding.numel()}; the two must be embeddings of one size"
            )
        return F.cosine_similarity(flat, self.embedding.to(flat.device, flat.dtype)[None], dim=1)


@dataclass
class CallableTarget:
    """What a user's callable makes of the model output: (N, ...) -> (N,), one scalar per row."""

    classes: Tensor
    fn: Callable[[Tensor], Tensor]
    name: str

    @property
    def about(self) -> dict[str, object]:
        return {"kind": "callable", "callable": self.name}

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        return checked_scores(self.fn(output), output, self.name)


@dataclass
class TextTarget:
    """A CLIP-style model's similarity to one prompt: its output (N, 1) is logit_scale * cos(image, text)."""

    classes: Tensor
    prompt: str

    @property
    def about(self) -> dict[str, object]:
        return {"kind": "text", "prompt": self.prompt}

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        return output[:, 0]


def checked_scores(got: object, output: Tensor, name: str) -> Tensor:
    """``got``, a callable target's result on ``output``, if it is one scalar per row; UsageError naming
    the shape it has and the shape expected otherwise."""
    expected = (output.shape[0],)
    shape = tuple(got.shape) if isinstance(got, Tensor) else None
    if shape != expected:
        what = f"shape {shape}" if shape is not None else f"a {type(got).__name__}, not a tensor"
        raise UsageError(
            f"--target {name!r} returned {what}; expected shape {expected}: one scalar per image of the "
            f"model output of shape {tuple(output.shape)}"
        )
    assert isinstance(got, Tensor)
    return got


def described(target: Target) -> dict[str, object] | None:
    """What a target that is no class explains (its kind, and the reference or callable), for records."""
    return getattr(target, "about", None)


def contrast(target: Target, logits: Tensor, references: int, alpha: float) -> ContrastTarget:
    """The contrast around ``target``'s classes: the ``references`` classes whose logits are closest to
    the target's (the target itself excluded, at most all other classes), weighted by ``alpha``."""
    if logits.dim() != 2:
        raise UsageError("finercam contrasts class scores; this model's output is not (batch, classes)")
    if logits.shape[1] < 2:
        raise UsageError("finercam needs a model with at least two classes")
    c = target.classes.clamp(min=0).to(logits.device)
    dist = (logits - logits.gather(1, c[:, None])).abs()
    dist.scatter_(1, c[:, None], float("inf"))
    refs = dist.topk(min(references, logits.shape[1] - 1), dim=1, largest=False).indices
    return ContrastTarget(target.classes, refs, alpha)


@dataclass(frozen=True)
class Region:
    """A segmentation target's region: a box [x0, y0, x1, y1] in the image's pixels or in fractions
    (``unit``, see camcli/boxes.py), or a mask image whose non-zero pixels are inside. None
    anywhere: the predicted pixels."""

    box: tuple[float, float, float, float] | None = None
    mask: str | None = None
    unit: str = "pixels"

    def __str__(self) -> str:
        return f"mask {self.mask}" if self.mask else "box " + ",".join(f"{v:g}" for v in self.box or ())

    def on_grid(self, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> Tensor:
        """The region as a (gh, gw) float mask on the model output's grid."""
        gh, gw = grid_hw
        if self.mask is not None:
            from camcli.images import decode

            m = torch.from_numpy(decode(self.mask).max(axis=2) > 0).float()
            return torch.nn.functional.interpolate(m[None, None], size=(gh, gw), mode="nearest")[0, 0]
        assert self.box is not None
        h, w = image_hw
        x0, y0, x1, y1 = self.box
        if self.unit == "pixels":
            x0, x1, y0, y1 = x0 / w, x1 / w, y0 / h, y1 / h  # pixels -> fractions
        out = torch.zeros(gh, gw)
        r0, r1 = int(round(y0 * gh)), max(int(round(y0 * gh)) + 1, int(round(y1 * gh)))
        c0, c1 = int(round(x0 * gw)), max(int(round(x0 * gw)) + 1, int(round(x1 * gw)))
        out[r0:r1, c0:c1] = 1.0
        return out


def parse_region(box: Box | str | None, mask: str | None) -> Region | None:
    """``--region`` (a boxes.Box, or its text "x0,y0,x1,y1" / "fraction:x0,y0,x1,y1": pixels, or
    fractions in [0, 1], camcli/boxes.py says which) or ``--region-mask FILE``."""
    if box is not None and mask is not None:
        raise UsageError("give --region or --region-mask, not both")
    if mask is not None:
        from pathlib import Path

        if not Path(mask).is_file():
            raise UsageError(f"--region-mask {mask!r}: no such file (an image whose non-zero pixels are the region)")
        return Region(mask=mask)
    if box is None:
        return None
    problem = region_problem(box)
    if problem:
        raise UsageError(f"--region {box!r} {problem}")
    parsed = region_box(box)
    return Region(box=parsed.values, unit=parsed.unit)


@dataclass
class SegmentTarget:
    """Class c's score summed over a region of the output grid (B, H, W masks), per image."""

    classes: Tensor  # (B,)
    masks: Tensor  # (B, H, W) float, 1 inside the region
    kind: str  # "predicted", "box" or "mask"

    def score(self, output: Tensor, rows: Tensor) -> Tensor:
        rows = rows.to(output.device)
        c = self.classes.clamp(min=0).to(output.device)[rows]
        maps = output[torch.arange(output.shape[0], device=output.device), c]  # (N, H, W)
        masks = self.masks.to(output.device, output.dtype)[rows]
        if masks.shape[-2:] != maps.shape[-2:]:
            masks = torch.nn.functional.interpolate(masks[:, None], size=maps.shape[-2:], mode="nearest")[:, 0]
        return (maps * masks).sum(dim=(-2, -1))

    def shares(self) -> Tensor:
        """(B,) the share of the output grid inside each image's region (stays on the device)."""
        return self.masks.flatten(1).float().mean(dim=1)


def describe_region(kind: str | None, share: float) -> dict[str, object]:
    """A segmentation target's region as the summary records it."""
    return {"kind": kind, "share": round(share, 6)}


def pixel_shares(scores: Tensor) -> Tensor:
    """(B, C, H, W) segmentation scores -> (B, C) share of pixels each class wins."""
    pred = scores.argmax(dim=1)
    return torch.nn.functional.one_hot(pred, scores.shape[1]).flatten(1, 2).float().mean(dim=1)


def class_indices(specs: Sequence[TargetSpec], logits: Tensor) -> Tensor:
    """(B, T) class indices per image; a repeated class within a row becomes -1 (skip).
    ``logits``: what ranks the classes (topK) and what ``above:T`` compares with T, per image and
    class: probabilities under the activation, or pixel shares."""
    b = logits.shape[0]
    # topK columns are prefixes of one another: a later topK adds only the ranks not taken yet, so a
    # slot that is a duplicate in every row (top1 then top3) never exists and nobody has to look at
    # the values (on a GPU that would be a wait per slot).
    k_max = max((s.k for s in specs if isinstance(s, TopK)), default=0)
    ranked = logits.topk(k_max, dim=1).indices if k_max else None
    cols: list[Tensor] = []
    ranks_taken = 0
    for s in specs:
        if isinstance(s, TopK):
            if s.k > ranks_taken:
                assert ranked is not None
                cols.append(ranked[:, ranks_taken : s.k])
                ranks_taken = s.k
        elif isinstance(s, Above):
            cols.append(above(logits, s.threshold))
        elif isinstance(s, ClassIndex):
            cols.append(torch.full((b, 1), s.index, dtype=torch.long, device=logits.device))
    if not cols:
        return torch.empty((b, 0), dtype=torch.long, device=logits.device)
    idx = torch.cat(cols, dim=1)
    out = idx.clone()
    for j in range(1, idx.shape[1]):
        dup = (idx[:, :j] == idx[:, j : j + 1]).any(dim=1)
        out[:, j] = torch.where(dup, -1, idx[:, j])  # no boolean indexing: it would wait for the device
    return out


def above(values: Tensor, threshold: float) -> Tensor:
    """(B, n) the classes whose value is above ``threshold``, best first, -1 where a row has fewer
    than n = the most any row has (one wait for the device, to know n)."""
    passed = values > threshold
    n = int(passed.sum(dim=1).max()) if values.numel() else 0
    ranked = values.masked_fill(~passed, float("-inf")).topk(n, dim=1)
    return torch.where(torch.isfinite(ranked.values), ranked.indices, -1)


def resolve(
    specs: Sequence[TargetSpec],
    logits: Tensor,
    region: Region | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    probs: Tensor | None = None,
    through: Activation | None = None,
) -> list[Target]:
    """The targets of a batch, one per slot, from the specs and the batch's scores.

    Classifiers: the class logit (``not:K``: minus it). Segmentation scores (B, C, H, W): topK ranks
    classes by the pixels they win, and the target sums class c's score over ``region`` (image
    pixels, ``sizes`` per image) or, by default, over the pixels the model assigns to c.
    ``probs``: (B, classes) the values that rank classes and that ``above:T`` compares (under the
    activation; default: the logits, or the pixel shares). ``through``: a classifier's class targets
    explain their value under this activation instead of the logit (--score probability).
    """
    own = [s for s in specs if isinstance(s, OUTPUT_SPECS)]
    if own:
        if len(own) != len(specs):
            raise UsageError("--reference, --target and one --text explain one scalar of the output, not a class: "
                             "drop --class")
        zeros = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return [s.target(zeros) for s in own]
    negated = [s for s in specs if isinstance(s, Not)]
    if negated and logits.dim() != 2:
        raise UsageError(f"--class {negated[0]}: not: is for classifiers, whose output is (batch, classes)")
    ranking = probs if probs is not None else (logits if logits.dim() == 2 else pixel_shares(logits))
    if logits.dim() == 2:
        idx = class_indices(specs, ranking)
        full = logits.shape[0]
        nots: list[Target] = [
            NotTarget(torch.full((full,), s.index, dtype=torch.long, device=logits.device)) for s in negated
        ]
        return [ClassTarget(idx[:, t], through) for t in range(idx.shape[1])] + nots
    idx = class_indices(specs, ranking)
    grid = (logits.shape[-2], logits.shape[-1])
    if region is not None:
        hw = list(sizes) if sizes is not None else [grid] * logits.shape[0]
        fixed = torch.stack([region.on_grid(s, grid) for s in hw]).to(logits.device)
        return [SegmentTarget(idx[:, t], fixed, "mask" if region.mask else "box") for t in range(idx.shape[1])]
    pred = logits.argmax(dim=1)
    return [
        SegmentTarget(idx[:, t], (pred == idx[:, t, None, None]).float(), "predicted") for t in range(idx.shape[1])
    ]


def is_default(specs: Sequence[TargetSpec]) -> bool:
    """True for the plain ``top1`` default, whose output names carry no class suffix."""
    return list(specs) == [TopK(1)]
