"""`camcli evaluate`: compare methods on your own images with faithfulness and localisation metrics."""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from camcli import metrics as M
from camcli import targets as tgt
from camcli.config import read_yaml
from camcli.errors import ExitCode, ImageError, UsageError, suggest
from camcli.feed import Batch, Decoder, Item, feed, find_inputs
from camcli.images import ImageSource, image_size, skipped_warning, stack_images
from camcli.models import LoadedModel
from camcli.options import EvaluateOptions
from camcli.outdir import check_writable, locked
from camcli.sanity import SANITY_SEEDS, SanityScore, cascade, randomized_copy, sanity_score
from camcli.session import Session, stderr_warning
from camcli.writer import write_atomic

BASELINES = ("baseline:random", "baseline:center")
DEFAULT_METRICS = ("deletion_auc", "insertion_auc", "average_drop", "increase_in_confidence", "complexity",
                   "road_morf", "road_lerf", "road_combined", "sanity_spearman")
BOX_METRICS = ("energy_pointing_game", "pointing_game")


@dataclass
class EvaluationResult:
    aggregate: dict[str, dict[str, dict[str, Any]]]
    images: list[dict[str, Any]]
    path: Path
    exit_code: ExitCode = ExitCode.OK
    curves: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)


def parse_metrics(spec: str | list[str] | None, have_boxes: bool) -> list[str]:
    if spec is None:
        return list(DEFAULT_METRICS) + (list(BOX_METRICS) if have_boxes else [])
    parts = [spec] if isinstance(spec, str) else list(spec)
    names = [p.strip() for part in parts for p in part.split(",") if p.strip()]
    for n in names:
        if n not in M.METRICS:
            raise UsageError(f"unknown metric {n!r}{suggest(n, M.METRICS) or ''} (accepted: {', '.join(M.METRICS)})")
        if n in BOX_METRICS and not have_boxes:
            raise UsageError(f"metric {n!r} needs --boxes FILE (a JSON or YAML map from image to boxes)")
    return list(dict.fromkeys(names))


Box = list[float]


def _box(where: str, value: object) -> Box:
    if not isinstance(value, list) or len(value) != 4 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise UsageError(f"{where}: {value!r} is not a box [x0, y0, x1, y1] of numbers (pixels)")
    return [float(v) for v in value]


def load_boxes(path: str | Path) -> dict[str, list[Box]]:
    """{image: [[x0, y0, x1, y1], ...]} keyed by relative path, path or file name, in the image's
    pixels; one box may be given without the outer list. Wrong shapes and types are usage errors."""
    p = Path(path)
    what = f"--boxes {str(p)!r}"
    data = read_yaml(p, what)  # JSON is YAML too
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{what}: expected a mapping from image to a list of boxes [x0, y0, x1, y1]")
    out: dict[str, list[Box]] = {}
    for key, boxes in data.items():
        where = f"{what}: {str(key)!r}"
        if isinstance(boxes, list) and boxes and not isinstance(boxes[0], list):
            boxes = [boxes]
        if not isinstance(boxes, list) or not boxes:
            raise UsageError(f"{where}: expected a non-empty list of boxes [x0, y0, x1, y1], got {boxes!r}")
        out[str(key)] = [_box(where, b) for b in boxes]
    return out


def match_boxes(boxes: dict[str, list[Box]], sources: Sequence[ImageSource], what: str,
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
        for b in bxs:
            x0, y0, x1, y1 = b
            if not (x0 < x1 and y0 < y1):
                raise UsageError(f"{where}: box {b} is inverted or empty (need x0 < x1 and y0 < y1)")
            if w is not None and h is not None and not (0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h):
                raise UsageError(f"{where}: box {b} lies outside the {w}x{h} image "
                                 f"(need 0 <= x0 < x1 <= {w}, 0 <= y0 < y1 <= {h})")
        out[i] = bxs
    return out


def _stats(values: list[float]) -> dict[str, Any]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(vals, dtype=np.float64)
    return {"mean": round(float(arr.mean()), 6), "std": round(float(arr.std()), 6), "n": len(vals)}


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
        return _evaluate(inputs, opts, model=model, progress=progress, on_start=on_start)


def _evaluate(
    inputs: Sequence[str | Path],
    opts: EvaluateOptions,
    *,
    model: LoadedModel | None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> EvaluationResult:
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
    if len(specs) != 1 or (isinstance(specs[0], tgt.TopK) and specs[0].k != 1):
        raise UsageError("evaluate explains one class per image: --class top1, an index or a label")
    if session.model.task != "classification":
        raise UsageError("evaluate's metrics (class probability under deletion, ROAD, ...) are defined for "
                         f"classifiers; {session.model.name} is a segmentation model")
    lm, device, layers, methods = session.model, session.device, session.layers, session.methods
    pb = opts.perturbation_batch
    random_engines = []
    reinitialised: list[str] = []
    if "sanity_spearman" in wanted:
        example = torch.zeros(1, 3, lm.input_size, lm.input_size, device=device)
        reinitialised = cascade(lm.module, layers[0], example)
        random_engines = [session.engine_for(randomized_copy(lm.module, reinitialised, seed=opts.seed + k))
                          for k in range(SANITY_SEEDS)]
    names = [m.name for m in methods] + list(BASELINES)
    per_image: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[list[float]]]] = {n: {"deletion": [], "insertion": []} for n in names}
    failed = False
    # Metrics of a window of images (--batch-size of them) are queued in one Batcher, so their
    # perturbed inputs share forward passes across images, maps, metrics and curve steps.
    batcher = M.Batcher(session.logits, pb)
    if (skipped := skipped_warning(found.skipped)) is not None:
        session.warn(skipped)
    if on_start is not None:
        on_start(len(sources))
    noted = False
    explained = _explained(session, sources, opts.max_pixels)
    while window := list(itertools.islice(explained, session.batch_size)):
        queued = []
        for idx, src, size, note, x, outs in window:
            if isinstance(size, ImageError):
                per_image.append({"path": str(src.path), "status": "error", "error": str(size)})
                failed = True
                continue
            if note and not noted:
                session.warn(f"{src.path}: {note}")
                noted = True
            h, w = x.shape[-2:]
            target = next((m.target for m in outs.maps if m.target is not None), outs.top[0][0])
            maps: dict[str, torch.Tensor] = {m.method: _to_input(m.cam, h, w) for m in outs.maps}
            grid = _baseline_grid(outs, h, w)
            maps["baseline:random"] = M.random_map(h, w, seed=opts.seed * 100003 + idx, grid=grid)
            maps["baseline:center"] = M.center_map(h, w)
            randomized: dict[str, list[np.ndarray | None]] = defaultdict(list)  # per method, one per seed
            for engine in random_engines:
                for m in engine.explain(x[None], [tgt.ClassIndex(target)])[0].maps:
                    randomized[m.method].append(None if m.empty else _to_input(m.cam, h, w).numpy())
            img_boxes = boxes_of.get(idx)
            sx, sy = w / size[1], h / size[0]
            scaled = None if img_boxes is None else [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in img_boxes]
            record: dict[str, Any] = {"path": str(src.path), "status": "ok", "target": {"index": target,
                                      "label": lm.label(target), "probability": None}, "metrics": {}}
            if note:
                record["note"] = note
            per_image.append(record)  # in input order; probability and metrics filled below
            jobs: dict[str, dict[str, M.Job]] = {}
            for name, cam in maps.items():
                j = jobs[name] = {}
                if "deletion_auc" in wanted:
                    j["deletion"] = batcher.add(M.deletion_inputs(x, cam.to(device), opts.steps), target, x)
                if "insertion_auc" in wanted:
                    j["insertion"] = batcher.add(M.insertion_inputs(x, cam.to(device), opts.steps), target, x)
                if {"average_drop", "increase_in_confidence"} & set(wanted):
                    e = M.explanation_image(x, cam.to(device), lm.mean, lm.std)
                    j["explanation"] = batcher.add((1, lambda i, e=e: e), target, x)
                if {"road_morf", "road_lerf", "road_combined"} & set(wanted):
                    j["road"] = batcher.add(M.road_inputs(x, cam, lm.mean, lm.std, percentages=opts.road_percentages,
                                                          seed=opts.seed), target, x)
            whole = batcher.add((1, lambda i, x=x: x), target, x)
            queued.append((idx, record, whole, maps, jobs, randomized, scaled, grid))
        batcher.run()
        for idx, record, whole, maps, jobs, randomized, scaled, grid in queued:
            h, w = next(iter(maps.values())).shape
            y = float(whole.result[0])
            record["target"]["probability"] = round(y, 6)
            for name, cam in maps.items():
                j = jobs[name]
                vals: dict[str, float | None] = {}
                for kind in ("deletion", "insertion"):
                    if kind in j:
                        curve = j[kind].result
                        vals[f"{kind}_auc"] = M.auc(curve)
                        curves[name][kind].append(curve.tolist())
                if "explanation" in j:
                    o = float(j["explanation"].result[0])
                    if "average_drop" in wanted:
                        vals["average_drop"] = M.average_drop(y, o)
                    if "increase_in_confidence" in wanted:
                        vals["increase_in_confidence"] = M.increase_in_confidence(y, o)
                if "complexity" in wanted:
                    vals["complexity"] = M.complexity(cam)
                if "road" in j:
                    road = M.road_scores(j["road"].result, len(opts.road_percentages))
                    for key, v in zip(("road_morf", "road_lerf", "road_combined"), road):
                        if key in wanted:
                            vals[key] = v
                if "sanity_spearman" in wanted:
                    score = _sanity(name, cam, randomized, h, w, opts.seed * 100003 + idx, grid)
                    vals["sanity_spearman"] = score.value
                    record.setdefault("sanity", {})[name] = score.record()
                if scaled is not None:
                    camnp = cam.cpu().numpy()
                    if "energy_pointing_game" in wanted:
                        vals["energy_pointing_game"] = M.energy_pointing_game(camnp, scaled)
                    if "pointing_game" in wanted:
                        vals["pointing_game"] = M.pointing_game(camnp, scaled)
                record["metrics"][name] = {k: (None if v is None else round(float(v), 6)) for k, v in vals.items()}
        if progress is not None:
            progress(len(window))
    aggregate = {
        name: {metric: _stats([im["metrics"][name].get(metric) for im in per_image if im["status"] == "ok"])
               for metric in wanted}
        for name in names
    }
    for name in names[: len(methods)]:
        for metric in wanted:
            aggregate[name][metric]["beats_baselines"] = _beats(aggregate, name, metric)
    doc = {
        "schema_version": 1,
        "model": {"name": lm.name, "layer": ",".join(layers), "weights_sha256": lm.weights_sha256},
        "options": session.record(),
        "settings": {"steps": opts.steps, "road_percentages": list(opts.road_percentages), "road_noise": M.ROAD_NOISE,
                     "seed": opts.seed, "blur": {"kernel": M.BLUR_KERNEL, "sigma": M.BLUR_SIGMA},
                     "deletion_fill": "the image's mean colour", "class": str(specs[0]),
                     **({"sanity": {"seeds": SANITY_SEEDS, "value": "mean |Spearman rho| over the seeds",
                                    "reinitialised": "cascade from the logits down to the target layer, final step",
                                    "modules": reinitialised}} if reinitialised else {})},
        "metrics": wanted,
        **({"skipped_entries": len(found.skipped)} if found.skipped else {}),  # FIFOs, sockets, broken links
        "aggregate": aggregate,
        "images": per_image,
    }
    path = out_dir / "evaluation.json"
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())
    result = EvaluationResult(aggregate, per_image, path, ExitCode.PARTIAL if failed else ExitCode.OK, curves)
    if opts.plots:
        write_plots(result, out_dir)
    return result


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
                                zip(got.items, session.explain(stack_images(got.tensors, session.device)))))
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


def _sanity(name: str, cam: torch.Tensor, randomized: dict[str, list[np.ndarray | None]], h: int, w: int, seed: int,
            grid: tuple[int, int]) -> SanityScore:
    """Mean |Spearman rho| between the trained and the randomised models' maps (low is good). The
    baselines do not depend on the model: random is compared with other random maps (about 0),
    center with itself (1.0)."""
    mine = cam.cpu().numpy()
    if name == "baseline:random":
        others = [M.random_map(h, w, seed + 7919 * (k + 1), grid=grid).numpy() for k in range(SANITY_SEEDS)]
        return sanity_score(mine, others)
    if name == "baseline:center":
        return sanity_score(mine, [mine] * SANITY_SEEDS)
    return sanity_score(mine, randomized.get(name, []))


def _beats(aggregate: dict[str, dict[str, dict[str, Any]]], name: str, metric: str) -> bool | None:
    mine = aggregate[name][metric]["mean"]
    base = [aggregate[b][metric]["mean"] for b in BASELINES if aggregate[b][metric]["mean"] is not None]
    if mine is None or not base:
        return None
    return mine > max(base) if M.HIGHER_IS_BETTER[metric] else mine < min(base)


def write_plots(result: EvaluationResult, out_dir: Path) -> list[Path]:
    """Mean deletion and insertion curves per method, one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for kind in ("deletion", "insertion"):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        drew = False
        for name, c in result.curves.items():
            if c[kind]:
                mean = np.mean(np.asarray(c[kind]), axis=0)
                xs = np.linspace(0, 1, len(mean))
                ax.plot(xs, mean, label=f"{name} (AUC {np.trapezoid(mean, xs):.3f})",
                        linestyle="--" if name.startswith("baseline") else "-")
                drew = True
        if not drew:
            plt.close(fig)
            continue
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("target class probability")
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
