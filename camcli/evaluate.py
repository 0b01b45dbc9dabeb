"""`camcli evaluate`: compare methods on your own images with faithfulness and localisation metrics."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from camcli import metrics as M
from camcli import targets as tgt
from camcli.errors import ExitCode, ImageError, UsageError, suggest
from camcli.images import decode, discover
from camcli.layers import trace_layers
from camcli.models import LoadedModel
from camcli.options import EvaluateOptions
from camcli.outdir import check_writable, locked
from camcli.sanity import randomized_copy, spearman
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


def load_boxes(path: str | Path) -> dict[str, list[list[float]]]:
    """{image: [[x0, y0, x1, y1], ...]} keyed by file name or path, in the image's pixels."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--boxes {str(p)!r}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))  # JSON is YAML too
    except yaml.YAMLError as e:
        raise UsageError(f"--boxes {str(p)!r}: not valid JSON/YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--boxes {str(p)!r}: expected a mapping from image to a list of boxes")
    out: dict[str, list[list[float]]] = {}
    for key, boxes in data.items():
        if boxes and isinstance(boxes[0], (int, float)):
            boxes = [boxes]
        if not isinstance(boxes, list) or not all(isinstance(b, list) and len(b) == 4 for b in boxes):
            raise UsageError(f"--boxes {str(p)!r}: {key!r} needs boxes [x0, y0, x1, y1]")
        out[str(key)] = [[float(v) for v in b] for b in boxes]
    return out


def _boxes_for(path: Path, boxes: dict[str, list[list[float]]]) -> list[list[float]] | None:
    for key in (str(path), path.as_posix(), path.name, path.stem):
        if key in boxes:
            return boxes[key]
    return None


def _stats(values: list[float]) -> dict[str, Any]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(vals, dtype=np.float64)
    return {"mean": round(float(arr.mean()), 6), "std": round(float(arr.std()), 6), "n": len(vals)}


def evaluate(inputs: Sequence[str | Path], opts: EvaluateOptions, *, model: LoadedModel | None = None) -> EvaluationResult:
    """Compute every requested metric for every method and both baselines on every image.

    Maps come from the same Session as `explain`'s, ``--batch-size`` images per forward pass;
    the metrics' perturbed inputs go ``--perturbation-batch`` to a forward pass. The run holds
    ``--out`` for itself (another run into it exits 2).
    """
    opts.validate()
    check_writable(Path(opts.out))
    with locked(Path(opts.out), "camcli evaluate", warn=None if opts.quiet else stderr_warning):
        return _evaluate(inputs, opts, model=model)


def _evaluate(inputs: Sequence[str | Path], opts: EvaluateOptions, *, model: LoadedModel | None) -> EvaluationResult:
    opts.validate()
    boxes = load_boxes(opts.boxes) if opts.boxes else None
    wanted = parse_metrics(opts.metric, boxes is not None)
    out_dir = Path(opts.out)
    sources = discover(inputs, opts.recursive, exclude=out_dir)
    check_writable(out_dir)
    session = Session.open(opts, model=model)
    specs = session.specs
    if len(specs) != 1 or (isinstance(specs[0], tgt.TopK) and specs[0].k != 1):
        raise UsageError("evaluate explains one class per image: --class top1, an index or a label")
    if session.model.task != "classification":
        raise UsageError("evaluate's metrics (class probability under deletion, ROAD, ...) are defined for "
                         f"classifiers; {session.model.name} is a segmentation model")
    lm, device, pre, layers, methods = session.model, session.device, session.preprocess, session.layers, session.methods
    pb = opts.perturbation_batch
    random_engine = None
    if "sanity_spearman" in wanted:
        example = torch.zeros(1, 3, lm.input_size, lm.input_size, device=device)
        top = _top_modules(lm.module, layers[0], example)
        random_engine = session.engine_for(randomized_copy(lm.module, top, seed=opts.seed))
    names = [m.name for m in methods] + list(BASELINES)
    per_image: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[list[float]]]] = {n: {"deletion": [], "insertion": []} for n in names}
    failed = False
    for idx, src, rgb, x, outs in _explained(session, sources):
        if isinstance(rgb, ImageError):
            per_image.append({"path": str(src.path), "status": "error", "error": str(rgb)})
            failed = True
            continue
        h, w = x.shape[-2:]
        target = next((m.target for m in outs.maps if m.target is not None), outs.top[0][0])

        def prob(batch: torch.Tensor, c: int = target) -> torch.Tensor:
            return session.logits(batch).softmax(dim=1)[:, c]

        maps: dict[str, torch.Tensor] = {m.method: _to_input(m.cam, h, w) for m in outs.maps}
        grid = _baseline_grid(outs, h, w)
        maps["baseline:random"] = M.random_map(h, w, seed=opts.seed * 100003 + idx, grid=grid)
        maps["baseline:center"] = M.center_map(h, w)
        randomized: dict[str, torch.Tensor] = {}
        if random_engine is not None:
            for m in random_engine.explain(x[None], [tgt.ClassIndex(target)])[0].maps:
                randomized[m.method] = _to_input(m.cam, h, w)
        y = float(prob(x[None])[0])
        img_boxes = _boxes_for(src.path, boxes) if boxes is not None else None
        sx, sy = w / rgb.shape[1], h / rgb.shape[0]
        scaled = None if img_boxes is None else [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in img_boxes]
        record: dict[str, Any] = {"path": str(src.path), "status": "ok", "target": {"index": target,
                                  "label": lm.label(target), "probability": round(y, 6)}, "metrics": {}}
        for name, cam in maps.items():
            vals: dict[str, float | None] = {}
            if "deletion_auc" in wanted:
                curve = M.deletion_curve(x, cam.to(device), prob, opts.steps, pb)
                vals["deletion_auc"] = M.auc(curve)
                curves[name]["deletion"].append(curve.tolist())
            if "insertion_auc" in wanted:
                curve = M.insertion_curve(x, cam.to(device), prob, opts.steps, pb)
                vals["insertion_auc"] = M.auc(curve)
                curves[name]["insertion"].append(curve.tolist())
            if {"average_drop", "increase_in_confidence"} & set(wanted):
                o = float(prob(M.explanation_image(x, cam.to(device), lm.mean, lm.std)[None])[0])
                if "average_drop" in wanted:
                    vals["average_drop"] = M.average_drop(y, o)
                if "increase_in_confidence" in wanted:
                    vals["increase_in_confidence"] = M.increase_in_confidence(y, o)
            if "complexity" in wanted:
                vals["complexity"] = M.complexity(cam)
            if {"road_morf", "road_lerf", "road_combined"} & set(wanted):
                morf, lerf, comb = M.road(x, cam, prob, lm.mean, lm.std, percentages=opts.road_percentages,
                                          seed=opts.seed, batch=pb)
                for key, v in (("road_morf", morf), ("road_lerf", lerf), ("road_combined", comb)):
                    if key in wanted:
                        vals[key] = v
            if "sanity_spearman" in wanted:
                vals["sanity_spearman"] = _sanity(name, cam, randomized, h, w, opts.seed * 100003 + idx, grid)
            if scaled is not None:
                camnp = cam.cpu().numpy()
                if "energy_pointing_game" in wanted:
                    vals["energy_pointing_game"] = M.energy_pointing_game(camnp, scaled)
                if "pointing_game" in wanted:
                    vals["pointing_game"] = M.pointing_game(camnp, scaled)
            record["metrics"][name] = {k: (None if v is None else round(float(v), 6)) for k, v in vals.items()}
        per_image.append(record)
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
                     "deletion_fill": "the image's mean colour", "class": str(specs[0])},
        "metrics": wanted,
        "aggregate": aggregate,
        "images": per_image,
    }
    path = out_dir / "evaluation.json"
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())
    result = EvaluationResult(aggregate, per_image, path, ExitCode.PARTIAL if failed else ExitCode.OK, curves)
    if opts.plots:
        write_plots(result, out_dir)
    return result


def _explained(session: Session, sources: Sequence[Any]) -> Iterator[tuple[int, Any, Any, Any, Any]]:  # noqa: ANN401
    """(index, source, rgb or ImageError, normalised input, ImageOutput) in input order; maps are
    computed ``--batch-size`` images of one input shape per forward pass."""
    bs = session.batch_size
    for start in range(0, len(sources), bs):
        chunk = list(enumerate(sources[start : start + bs], start))
        decoded: dict[int, Any] = {}
        for i, src in chunk:
            try:
                decoded[i] = decode(src.path)
            except ImageError as e:
                decoded[i] = e
        tensors = {i: session.preprocess.resize(rgb) for i, rgb in decoded.items() if not isinstance(rgb, ImageError)}
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, t in tensors.items():
            by_shape.setdefault(tuple(t.shape), []).append(i)
        results: dict[int, Any] = {}
        for ids in by_shape.values():
            for i, o in zip(ids, session.explain(torch.stack([tensors[i] for i in ids]))):
                results[i] = o
        for i, src in chunk:
            rgb = decoded[i]
            if isinstance(rgb, ImageError):
                yield i, src, rgb, None, None
                continue
            x = session.preprocess.normalize(tensors[i][None].to(session.device))[0]
            yield i, src, rgb, x, results[i]


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


def _sanity(name: str, cam: torch.Tensor, randomized: dict[str, torch.Tensor], h: int, w: int, seed: int,
            grid: tuple[int, int]) -> float | None:
    """Spearman between the trained and the randomised model's maps (low is good). The baselines do
    not depend on the model: random is compared with another random map, center with itself (1.0)."""
    if name == "baseline:random":
        return spearman(cam.numpy(), M.random_map(h, w, seed + 7919, grid=grid).numpy())
    if name == "baseline:center":
        return 1.0
    other = randomized.get(name)
    return None if other is None else spearman(cam.cpu().numpy(), other.cpu().numpy())


def _beats(aggregate: dict[str, dict[str, dict[str, Any]]], name: str, metric: str) -> bool | None:
    mine = aggregate[name][metric]["mean"]
    base = [aggregate[b][metric]["mean"] for b in BASELINES if aggregate[b][metric]["mean"] is not None]
    if mine is None or not base:
        return None
    return mine > max(base) if M.HIGHER_IS_BETTER[metric] else mine < min(base)


def _top_modules(net: torch.nn.Module, layer: str, example: torch.Tensor) -> list[str]:
    """Modules re-initialised for the sanity check: the target layer and everything that finishes
    after it (its ancestors excluded: they contain the whole network below it)."""
    infos = trace_layers(net, example)
    start = next(i.finished for i in infos if i.name == layer)
    ancestors = {layer.rsplit(".", k)[0] for k in range(1, layer.count(".") + 1)}
    return [
        i.name
        for i in infos
        if i.name == layer or i.name.startswith(layer + ".") or (i.finished >= start and i.name not in ancestors)
    ]


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
