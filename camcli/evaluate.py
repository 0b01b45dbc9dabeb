"""`camcli evaluate`: compare methods on your own images with faithfulness and localisation metrics."""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from camcli import jsonout
from camcli import metrics as M
from camcli import targets as tgt
from camcli.boxes import Box as UnitBox
from camcli.boxes import BoxError, parse_box
from camcli.config import read_yaml
from camcli.errors import ExitCode, ImageError, UsageError
from camcli.evaluation_records import RECORDS_NAME, CurveMeans, RecordWriter, iter_records
from camcli.feed import Batch, Decoder, Item, feed, find_inputs
from camcli.images import ImageSource, image_size, skipped_warning, stack_images
from camcli.metric_registry import PROBES, MapResult, ProbeContext, get_metric, measure, parse_metrics, probes_for
from camcli.models import LoadedModel
from camcli.options import EvaluateOptions
from camcli.outdir import check_writable, locked
from camcli.sanity import (SANITY_SEEDS, SANITY_THRESHOLD, SanityScore, cascade, randomized_copy, sanity_passes,
                           sanity_score)
from camcli.session import Session, stderr_warning
from camcli.writer import write_atomic

BASELINES = ("baseline:random", "baseline:center")
__all__ = ["BASELINES", "EvaluateOptions", "EvaluationResult", "evaluate", "load_boxes", "match_boxes", "parse_metrics",
           "write_plots"]


@dataclass
class EvaluationResult:
    """What a run wrote. ``aggregate`` is evaluation.json's; the per-image records are in
    ``records_path`` (evaluation-records.jsonl): ``records()`` streams them, ``images`` lists them."""

    aggregate: dict[str, dict[str, dict[str, Any]]]
    path: Path  # evaluation.json
    records_path: Path
    counts: dict[str, int]  # images, ok, error
    exit_code: ExitCode = ExitCode.OK
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # name -> kind -> mean curve

    def records(self) -> Iterator[dict[str, Any]]:
        """The image records in input order, read from the records file (constant memory)."""
        return iter_records(self.records_path)

    @property
    def images(self) -> list[dict[str, Any]]:
        """Every image record, in input order."""
        return list(self.records())


Box = list[float]


def _box(where: str, value: object) -> UnitBox:
    """A box of the file: pixels, or {fraction: [...]} (a plain list in [0, 1] is refused as ambiguous)."""
    try:
        return parse_box(value, plain_fractions=False)
    except BoxError as e:
        raise UsageError(f"{where}: {e}") from None


def load_boxes(path: str | Path) -> dict[str, list[UnitBox]]:
    """{image: [[x0, y0, x1, y1], ...]} keyed by relative path, path or file name, in the image's
    pixels (or {fraction: [x0, y0, x1, y1]}); one box may be given without the outer list. Wrong
    shapes and types are usage errors."""
    p = Path(path)
    what = f"--boxes {str(p)!r}"
    data = read_yaml(p, what)  # a .json file is read as JSON
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{what}: expected a mapping from image to a list of boxes [x0, y0, x1, y1]")
    out: dict[str, list[UnitBox]] = {}
    for key, boxes in data.items():
        where = f"{what}: {str(key)!r}"
        if isinstance(boxes, dict) or (isinstance(boxes, list) and boxes and not isinstance(boxes[0], (list, dict))):
            boxes = [boxes]  # one box without the outer list
        if not isinstance(boxes, list) or not boxes:
            raise UsageError(f"{where}: expected a non-empty list of boxes [x0, y0, x1, y1], got {boxes!r}")
        out[str(key)] = [_box(where, b) for b in boxes]
    return out


def match_boxes(boxes: dict[str, list[UnitBox]], sources: Sequence[ImageSource], what: str,
                max_pixels: int) -> dict[int, list[Box]]:
    """Which image each key of a boxes file means, and its boxes checked against the image's size.

    A key matches an image by its relative path (as mirrored under --out) or its path as given
    first, and by its bare file name or stem only when that names one image. A key that matches no
    image or several, two keys for one image, and boxes that are inverted, empty or outside the
    image are usage errors naming the key.
    """
    by_path: dict[Path, int] = {}
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sources):
        by_path.setdefault(s.rel, i)
        by_path.setdefault(Path(os.path.abspath(s.path)), i)
        by_name[s.path.name].append(i)
        if s.path.stem != s.path.name:
            by_name[s.path.stem].append(i)
    owner: dict[int, str] = {}
    out: dict[int, list[Box]] = {}
    for key, bxs in boxes.items():
        where = f"{what}: {key!r}"
        i = by_path.get(Path(key), by_path.get(Path(os.path.abspath(key))))
        if i is None:
            hits = by_name.get(key, [])
            if not hits:
                shown = ", ".join(s.rel.as_posix() for s in sources[:5]) + (", ..." if len(sources) > 5 else "")
                raise UsageError(f"{where} matches no input image (images: {shown}); key boxes by the image's "
                                 "relative path or file name")
            if len(hits) > 1:
                raise UsageError(f"{where} matches {len(hits)} images ("
                                 f"{', '.join(sources[h].rel.as_posix() for h in hits)}); use the relative path")
            i = hits[0]
        if i in owner:
            raise UsageError(f"{where} and {owner[i]!r} both give boxes for {sources[i].path}; keep one")
        owner[i] = key
        try:
            w, h = image_size(sources[i].path, max_pixels)
        except ImageError:
            w = h = None  # the image fails on its own, with its own error
        pixel_boxes = [list(ub.pixels(w, h)) if w is not None and h is not None else list(ub.values) for ub in bxs]
        for b in pixel_boxes:
            x0, y0, x1, y1 = b
            if not (x0 < x1 and y0 < y1):
                raise UsageError(f"{where}: box {b} is inverted or empty (need x0 < x1 and y0 < y1)")
            if w is not None and h is not None and not (0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h):
                raise UsageError(f"{where}: box {b} lies outside the {w}x{h} image "
                                 f"(need 0 <= x0 < x1 <= {w}, 0 <= y0 < y1 <= {h})")
        out[i] = pixel_boxes
    return out


def evaluate(
    inputs: Sequence[str | Path],
    opts: EvaluateOptions,
    *,
    model: LoadedModel | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> EvaluationResult:
    """Compute every requested metric for every method and both baselines on every image.

    Maps come from the same Session as `explain`'s, ``--batch-size`` images per forward pass;
    the metrics' perturbed inputs, across the images of such a window, their maps, metrics and
    curve steps, go ``--perturbation-batch`` to a forward pass. ``progress(n)`` is called as images
    finish, after ``on_start(total)``. The run holds ``--out`` for itself (another run into it exits 2).
    """
    opts.validate()
    check_writable(Path(opts.out))
    with locked(Path(opts.out), "camcli evaluate", warn=None if opts.quiet else stderr_warning):
        return _run_evaluation(inputs, opts, model=model, progress=progress, on_start=on_start)


def _run_evaluation(
    inputs: Sequence[str | Path],
    opts: EvaluateOptions,
    *,
    model: LoadedModel | None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> EvaluationResult:
    """The run, with --out held: open the session, stream the records, write evaluation.json."""
    opts.validate()
    boxes = load_boxes(opts.boxes) if opts.boxes else None
    wanted = parse_metrics(opts.metric, boxes is not None)
    out_dir = Path(opts.out)
    found = find_inputs(inputs, opts.recursive, out_dir)
    sources = found.sources
    boxes_of = match_boxes(boxes, sources, f"--boxes {opts.boxes!r}", opts.max_pixels) if boxes is not None else {}
    check_writable(out_dir)
    session = Session.open(opts, model=model)
    specs = session.specs
    if len(specs) != 1 or (isinstance(specs[0], tgt.TopK) and specs[0].k != 1) or not isinstance(
        specs[0], (tgt.TopK, tgt.ClassIndex, *tgt.OUTPUT_SPECS)
    ):
        raise UsageError("evaluate explains one class per image (--class top1, an index or a label) or one "
                         "scalar (--reference, --target, one --text prompt)")
    if session.model.task != "classification":
        raise UsageError("evaluate's metrics (class probability under deletion, ROAD, ...) are defined for "
                         f"classifiers; {session.model.name} is a segmentation model")
    scorer = _ImageScorer(session, opts, wanted)
    names = [m.name for m in session.methods] + list(BASELINES)
    if (skipped := skipped_warning(found.skipped)) is not None:
        session.warn(skipped)
    if on_start is not None:
        on_start(len(sources))
    writer = RecordWriter(out_dir / RECORDS_NAME)
    curves = CurveMeans()
    noted = False
    try:
        explained = _explained(session, sources, opts.max_pixels)
        while window := list(itertools.islice(explained, session.batch_size)):
            # the window's perturbed inputs share forward passes (one Batcher run), then its records
            # are written in input order and dropped
            queued: list[dict[str, Any] | _Queued] = []
            for idx, src, size, note, x, outs in window:
                if isinstance(size, ImageError):
                    queued.append({"path": str(src.path), "status": "error", "error": str(size)})
                    continue
                if note and not noted:
                    session.warn(f"{src.path}: {note}")
                    noted = True
                queued.append(scorer.queue(idx, src, size, note, x, outs, boxes_of.get(idx)))
            scorer.batcher.run()
            for q in queued:
                writer.add(q if isinstance(q, dict) else scorer.finish(q, curves))
            writer.flush()
            if progress is not None:
                progress(len(window))
    finally:
        writer.close()
    aggregate = {name: {metric: writer.tally.stats(name, metric) for metric in wanted} for name in names}
    for name in names[: len(session.methods)]:
        for metric in wanted:
            aggregate[name][metric]["beats_baselines"] = _beats(aggregate, name, metric)
    counts = writer.counts()
    doc = {
        "schema_version": 2,
        "model": {"name": session.model.name, "layer": ",".join(session.layers),
                  "weights_sha256": session.model.weights_sha256},
        "options": session.record(),
        "settings": {"steps": opts.steps, "road_percentages": list(opts.road_percentages), "road_noise": M.ROAD_NOISE,
                     "seed": opts.seed, "blur": {"kernel": M.BLUR_KERNEL, "sigma": M.BLUR_SIGMA},
                     "deletion_fill": "the image's mean colour", "class": str(specs[0]),
                     **({"sanity": {"seeds": SANITY_SEEDS, "value": "mean |Spearman rho| over the seeds",
                                    "threshold": SANITY_THRESHOLD,
                                    "pass": f"mean |rho| < {SANITY_THRESHOLD} (beats_baselines); the baselines, "
                                            "independent of the model, score 1",
                                    "reinitialised": "cascade from the logits down to the target layer, final step",
                                    "modules": scorer.reinitialised}} if scorer.reinitialised else {})},
        "metrics": wanted,
        **({"skipped_entries": len(found.skipped)} if found.skipped else {}),  # FIFOs, sockets, broken links
        "counts": counts,
        "records": RECORDS_NAME,  # the per-image values, one JSON line per image in input order
        "aggregate": aggregate,
    }
    path = out_dir / "evaluation.json"
    write_atomic(path, (jsonout.dumps(doc, indent=2) + "\n").encode())
    result = EvaluationResult(aggregate, path, writer.path, counts,
                              ExitCode.PARTIAL if counts["error"] else ExitCode.OK, curves.means())
    if opts.plots:
        write_plots(result, out_dir, session.value_key)
    return result


@dataclass
class _Queued:
    """One image whose perturbed inputs wait in the Batcher: its record is finished after the run."""

    idx: int
    record: dict[str, Any]
    whole: M.Job  # the image itself: the target probability every ratio is taken against
    maps: dict[str, torch.Tensor]  # method or baseline -> (H, W) map at input resolution
    jobs: dict[str, dict[str, M.Job]]  # map name -> probe name -> its scored inputs
    randomized: dict[str, list[np.ndarray | None]]  # method -> its maps on the re-initialised models
    boxes: list[Box] | None  # in input pixels


class _ImageScorer:
    """Queues each image's maps and perturbed inputs in one Batcher and turns the scores into its record."""

    def __init__(self, session: Session, opts: EvaluateOptions, wanted: list[str]) -> None:
        self.session, self.opts, self.wanted = session, opts, wanted
        self.probes = probes_for(wanted)
        lm, device = session.model, session.device
        self.random_engines: list[Any] = []
        self.reinitialised: list[str] = []
        if any(get_metric(m).needs_randomized for m in wanted):
            example = torch.zeros(1, 3, lm.input_size, lm.input_size, device=device)
            self.reinitialised = cascade(lm.module, session.layers[0], example)
            self.random_engines = [session.engine_for(randomized_copy(lm.module, self.reinitialised, seed=opts.seed + k))
                                   for k in range(SANITY_SEEDS)]
        # Metrics of a window of images (--batch-size of them) are queued in one Batcher, so their
        # perturbed inputs share forward passes across images, maps, metrics and curve steps.
        # A --reference, --target or one-prompt --text run scores its one scalar of the output, not a class.
        self.scalar = scalar_target(session.specs)
        self.batcher = M.Batcher(session.logits, opts.perturbation_batch, activation=session.activation,
                                 scalar=None if self.scalar is None else self.scalar.values)

    def queue(self, idx: int, src: ImageSource, size: tuple[int, int], note: str | None, x: torch.Tensor,
              outs: Any, boxes: list[Box] | None) -> _Queued:  # noqa: ANN401
        lm, opts = self.session.model, self.opts
        h, w = x.shape[-2:]
        target = next((m.target for m in outs.maps if m.target is not None), outs.top[0][0])
        maps: dict[str, torch.Tensor] = {m.method: _to_input(m.cam, h, w) for m in outs.maps}
        grid = _baseline_grid(outs, h, w)
        maps["baseline:random"] = M.random_map(h, w, seed=opts.seed * 100003 + idx, grid=grid)
        maps["baseline:center"] = M.center_map(h, w)
        randomized: dict[str, list[np.ndarray | None]] = defaultdict(list)  # per method, one per seed
        for engine in self.random_engines:
            specs = list(self.session.specs) if self.scalar is not None else [tgt.ClassIndex(target)]
            for m in engine.maps(x[None], specs)[0].maps:
                randomized[m.method].append(None if m.empty else _to_input(m.cam, h, w).numpy())
        sx, sy = w / size[1], h / size[0]
        scaled = None if boxes is None else [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]
        about = {"index": target, "label": lm.label(target)} if self.scalar is None else dict(self.scalar.about)
        record: dict[str, Any] = {"path": str(src.path), "status": "ok",
                                  "target": {**about, self.session.value_key: None}, "metrics": {}}
        if note:
            record["note"] = note
        jobs: dict[str, dict[str, M.Job]] = {}
        for name, cam in maps.items():
            ctx = ProbeContext(x, cam, self.session.device, lm.mean, lm.std, opts.steps, opts.road_percentages,
                               opts.seed)
            jobs[name] = {p.name: self.batcher.add(p.inputs(ctx), target, x) for p in self.probes}
        whole = self.batcher.add((1, lambda i, x=x: x), target, x)
        return _Queued(idx, record, whole, maps, jobs, randomized, scaled)

    def finish(self, q: _Queued, curves: CurveMeans) -> dict[str, Any]:
        """The image's record, its metrics filled in (the Batcher has run); its curves go to ``curves``."""
        y = float(q.whole.result[0])
        q.record["target"][self.session.value_key] = round(y, 6)
        for name, cam in q.maps.items():
            scores = {probe: job.result for probe, job in q.jobs[name].items()}
            for probe, curve in scores.items():
                if PROBES[probe].curve:
                    curves.add(name, probe, curve.numpy())

            def sanity(name: str = name, cam: torch.Tensor = cam) -> SanityScore:
                return _sanity(name, cam, q.randomized)

            result = MapResult(name, cam, y, scores, q.boxes, self.opts.road_percentages, sanity)
            q.record["metrics"][name] = measure(self.wanted, result, q.record)
        return q.record


@dataclass
class _Scalar:
    """The one scalar a --reference, --target or one-prompt --text run explains, as evaluate scores it."""

    target: Any  # a targets.Target  # noqa: ANN401

    @property
    def about(self) -> dict[str, object]:
        return tgt.described(self.target) or {}

    def values(self, output: torch.Tensor) -> torch.Tensor:
        """(N, ...) model outputs -> (N,) the scalar of each."""
        rows = torch.arange(output.shape[0], device=output.device)
        return self.target.score(output, rows)


def scalar_target(specs: Sequence[tgt.TargetSpec]) -> _Scalar | None:
    """The scalar target of a run whose one spec is no class (None for a class)."""
    if len(specs) != 1 or not isinstance(specs[0], tgt.OUTPUT_SPECS):
        return None
    return _Scalar(specs[0].target(torch.zeros(1, dtype=torch.long)))


def _explained(session: Session, sources: Sequence[Any], max_pixels: int) -> Iterator[tuple[int, Any, Any, Any, Any, Any]]:  # noqa: ANN401,E501
    """(index, source, (height, width) or ImageError, note, normalised input, ImageOutput) in input
    order. The images come through the feed (camcli/feed.py): decoded in worker processes no larger
    than the model input needs (no overlay is drawn here), maps computed for batches of one input
    shape under --batch-size and the pixel budget. Only the resized inputs are kept, never a batch
    of full-resolution images; an image waits here only until those before it are done."""
    done: dict[int, tuple[Item, Any]] = {}
    nxt = 0
    decoded = feed(sources, Decoder(session.preprocess, max_pixels, full_images=False), session.batch_size)
    try:
        for got in decoded:
            if isinstance(got, Batch):
                done.update(zip((i.index for i in got.items),
                                zip(got.items, session.explain_images(stack_images(got.tensors, session.device)))))
            else:
                done[got.index] = (got, None)
            while nxt in done:
                item, outs = done.pop(nxt)
                if item.error is not None:
                    yield nxt, sources[nxt], ImageError(item.error), None, None, None
                else:
                    x = session.preprocess.normalize(item.tensor[None].to(session.device))[0]
                    yield nxt, sources[nxt], item.size, item.note, x, outs
                nxt += 1
    finally:
        decoded.close()  # the decoding workers stop on every path


def _baseline_grid(outs: Any, h: int, w: int) -> tuple[int, int]:  # noqa: ANN401
    """The random baseline's grid: the layer's feature resolution, whatever the order of --method.
    Pixel-space maps (layer "input") never set it; without a layer map, 1/32 of the input."""
    for m in outs.maps:
        if m.layer != "input":
            return tuple(m.cam.shape)  # type: ignore[return-value]
    return max(1, h // 32), max(1, w // 32)


def _to_input(cam: np.ndarray, h: int, w: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))
    return F.interpolate(t[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp(min=0)


def _sanity(name: str, cam: torch.Tensor, randomized: dict[str, list[np.ndarray | None]]) -> SanityScore:
    """Mean |Spearman rho| between the trained and the randomised models' maps (low is good). The
    baselines do not depend on the model, so the randomised model gives each the same map: rho = 1
    (Adebayo et al.'s model-independent reference)."""
    mine = cam.cpu().numpy()
    if name in BASELINES:
        return sanity_score(mine, [mine] * SANITY_SEEDS)
    return sanity_score(mine, randomized.get(name, []))


def _beats(aggregate: dict[str, dict[str, dict[str, Any]]], name: str, metric: str) -> bool | None:
    mine = aggregate[name][metric]["mean"]
    base = [aggregate[b][metric]["mean"] for b in BASELINES if aggregate[b][metric]["mean"] is not None]
    if metric == "sanity_spearman":  # the baselines sit at 1: a pass is clearly below, under the stated threshold
        return sanity_passes(mine)
    if mine is None or not base:
        return None
    return mine > max(base) if get_metric(metric).higher_is_better else mine < min(base)


def write_plots(result: EvaluationResult, out_dir: Path, value_key: str = "probability") -> list[Path]:
    """Mean deletion and insertion curves per method, one PNG each (from the running sums).
    ``value_key``: probability, or value (--activation none: the raw output)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for kind in ("deletion", "insertion"):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        drew = False
        for name, c in result.curves.items():
            if kind in c:
                mean = np.asarray(c[kind])
                xs = np.linspace(0, 1, len(mean))
                ax.plot(xs, mean, label=f"{name} (AUC {np.trapezoid(mean, xs):.3f})",
                        linestyle="--" if name.startswith("baseline") else "-")
                drew = True
        if not drew:
            plt.close(fig)
            continue
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("target class probability" if value_key == "probability" else "target output value")
        ax.set_title(f"{kind} curve (mean over images)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{kind}_curve.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written
