"""`explain` as a plain function: inputs -> overlays, raw maps and summary.json.

Decoding runs in DataLoader workers, the engine computes a batch at a time, and a writer pool
upsamples, renders and writes while the next batch computes. Nothing is kept between batches but
the small per-image summary records.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from camcli import targets as tgt
from camcli.engine import CamEngine, CamMap, ImageOutput
from camcli.errors import ExitCode, UsageError
from camcli.images import ImageDataset, ImageSource, Preprocess, collate, discover
from camcli.layers import choose_layers
from camcli.methods import MethodOptions, parse_methods
from camcli.models import LoadedModel, load_model
from camcli.render import channel_grid, encode_png, overlay, resolve_colormap, upsample
from camcli.report import build_summary, prediction_entries, write_summary
from camcli.stats import map_stats
from camcli.writer import WriterPool, npy_bytes, write_atomic

DEVICES = ("auto", "cpu", "cuda", "mps")
SATURATION_WARN = 0.25  # warn when more than this share of bounded units is saturated


@dataclass
class ExplainOptions:
    """Every option of `camcli explain`; config files use the same keys (``-`` or ``_``)."""

    model: str | None = None
    weights: str | None = None
    labels: str | None = None
    unsafe_load: bool = False
    output_key: str | None = None
    layer: str | list[str] | None = None
    per_layer: bool = False
    method: str | list[str] = "gradcam"
    classes: list[str] | str | None = None
    out: str = "camcli-out"
    recursive: bool = False
    batch_size: int = 8
    workers: int | None = None  # None: auto (0 on <= 2 cores, where in-process decoding measured faster)
    device: str = "auto"
    alpha: float = 0.5
    colormap: str | None = None  # jet, or diverging for --signed
    image_size: int | None = None
    save_raw: bool = False
    signed: bool = False
    aug_smooth: bool = False
    eigen_smooth: bool = False
    fail_fast: bool = False
    score_channels: int | None = None
    perturbation_batch: int = 16
    channels: str = "mean"
    samples: int = 8  # SS-CAM / SmoothGrad-CAM++ noise samples, IS-CAM integration steps
    noise: float = 0.1  # SS-CAM / SmoothGrad-CAM++ noise std, as a share of the input's value range
    skip_existing: bool = False
    shard: str | None = None  # "K/N": this process takes the K-th of N deterministic parts
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--alpha {self.alpha} is out of range (accepted: 0.0 to 1.0)")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size} must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers {self.workers} must be 0 (decode in the main process) or more")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise UsageError(f"--device {self.device!r} is not one of {', '.join(DEVICES)} (or cuda:N)")
        if self.image_size is not None and self.image_size < 16:
            raise UsageError(f"--image-size {self.image_size} is too small (at least 16)")
        if self.score_channels is not None and self.score_channels < 1:
            raise UsageError(f"--score-channels {self.score_channels} must be at least 1")
        if self.perturbation_batch < 1:
            raise UsageError(f"--perturbation-batch {self.perturbation_batch} must be at least 1")
        if self.shard is not None:
            parse_shard(self.shard)
        if self.samples < 1:
            raise UsageError(f"--samples {self.samples} must be at least 1")
        if not 0.0 <= self.noise <= 10.0:
            raise UsageError(f"--noise {self.noise} is out of range (accepted: 0 to 10)")


@dataclass
class RunResult:
    summary: dict[str, Any]
    exit_code: ExitCode
    summary_path: Path


def auto_workers() -> int:
    """Decoding workers when --workers is not given: none on 2 cores or fewer, else up to 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(4, cores // 2)


def parse_shard(spec: str) -> tuple[int, int]:
    """'K/N' with 1 <= K <= N -> (K, N)."""
    try:
        k_s, n_s = spec.split("/")
        k, n = int(k_s), int(n_s)
    except ValueError:
        raise UsageError(f"--shard {spec!r} is not K/N (for example 2/8)") from None
    if not 1 <= k <= n:
        raise UsageError(f"--shard {spec!r}: K must be between 1 and N")
    return k, n


def shard_of(rel: Path, n: int) -> int:
    """The shard (1..n) an input belongs to: a stable hash of its relative path, the same on every machine."""
    digest = hashlib.sha1(rel.as_posix().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n + 1


def select_shard(sources: Sequence[ImageSource], spec: str | None) -> list[ImageSource]:
    if spec is None:
        return list(sources)
    k, n = parse_shard(spec)
    return [s for s in sources if shard_of(s.rel, n) == k]


def resolve_device(name: str) -> torch.device:
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


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".camcli-write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"--out {str(out)!r} cannot be written: {e.strerror or e}") from None


def output_stems(sources: Sequence[ImageSource]) -> list[Path]:
    """Mirror the input tree; two files with one stem in one folder (a.jpg, a.png) keep their suffix."""
    keys = [(s.rel.parent, s.rel.stem) for s in sources]
    counts = Counter(keys)
    return [s.rel.parent / (s.rel.stem if counts[k] == 1 else s.rel.name) for s, k in zip(sources, keys)]


def map_filename(stem: Path, m: CamMap, *, class_suffix: bool, layer_suffix: bool, ext: str) -> Path:
    parts = [stem.name, m.method.replace("+", "p")]  # gradcam++ -> gradcampp
    if layer_suffix:
        parts.append(m.layer)
    if class_suffix and m.target is not None:
        parts.append(str(m.target))
    return stem.parent / (".".join(parts) + ext)


def render_outputs(
    rgb: np.ndarray,
    out: ImageOutput,
    stem: Path,
    *,
    out_dir: Path,
    model: LoadedModel,
    colormap: int | np.ndarray,
    alpha: float,
    signed: bool,
    save_raw: bool,
    class_suffix: bool,
    fused_layer: str | None,
) -> list[dict[str, Any]]:
    """Upsample each map to the image, write overlay (and raw) atomically, return summary entries."""
    h, w = rgb.shape[:2]
    entries = []
    for m in out.maps:
        full = upsample(m.cam, h, w)
        layer_suffix = fused_layer is not None and m.layer != fused_layer
        rel_png = map_filename(stem, m, class_suffix=class_suffix, layer_suffix=layer_suffix, ext=".png")
        write_atomic(out_dir / rel_png, encode_png(overlay(rgb, full, colormap, alpha, signed)))
        rel_raw = None
        if save_raw:
            rel_raw = map_filename(stem, m, class_suffix=class_suffix, layer_suffix=layer_suffix, ext=".npy")
            write_atomic(out_dir / rel_raw, npy_bytes(full.astype(np.float32)))
        stats = map_stats(full, m.empty)
        if m.note:
            stats["note"] = m.note
        channels = None
        if m.channels is not None and m.channel_ids is not None:
            rel_grid = rel_png.with_name(rel_png.name[: -len(".png")] + ".grid.png")
            write_atomic(out_dir / rel_grid, encode_png(channel_grid(rgb, m.channels, m.channel_ids, colormap, alpha)))
            channels = {"ids": m.channel_ids, "grid": rel_grid.as_posix()}
        target = None
        if m.target is not None:
            target = {
                "index": m.target,
                "label": model.label(m.target),
                "score": None if m.score is None else round(m.score, 6),
                "probability": None if m.probability is None else round(m.probability, 6),
            }
        entries.append(
            {
                "method": m.method,
                "layer": m.layer,
                "target": target,
                "overlay": rel_png.as_posix(),
                "raw": None if rel_raw is None else rel_raw.as_posix(),
                "stats": stats,
                **({"channels": channels} if channels else {}),
            }
        )
    return entries


def _warn(msg: str) -> None:
    print(f"camcli: warning: {msg}", file=sys.stderr)


class Journal:
    """Completed image records, appended as they finish: lets --skip-existing resume a run.

    First line: {"fingerprint": ...} of the options that shape the outputs; then one record a line.
    """

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        self._file: Any = None

    def completed(self) -> dict[str, dict[str, Any]]:
        """Records of an earlier run with the same fingerprint, by source key."""
        if not self.path.is_file():
            return {}
        done: dict[str, dict[str, Any]] = {}
        with open(self.path, encoding="utf-8") as f:
            try:
                header = json.loads(f.readline() or "{}")
            except json.JSONDecodeError:
                return {}
            if header.get("fingerprint") != self.fingerprint:
                return {}
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by an interruption: everything before it stands
                done[entry["key"]] = entry["record"]
        return done

    def open(self, carried: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")
        self._file.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
        for key, rec in carried.items():
            self._file.write(json.dumps({"key": key, "record": rec}) + "\n")
        self._file.flush()

    def add(self, key: str, record: dict[str, Any]) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write(json.dumps({"key": key, "record": record}) + "\n")
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def source_key(src: ImageSource) -> str:
    st = src.path.stat()
    return f"{src.rel.as_posix()}|{st.st_size}|{st.st_mtime_ns}"


def outputs_exist(record: dict[str, Any], out_dir: Path) -> bool:
    if record.get("status") != "ok":
        return False
    files = [e[k] for e in record.get("explanations", []) for k in ("overlay", "raw") if e.get(k)]
    return bool(files) and all((out_dir / f).is_file() for f in files)


def _fingerprint(opts: ExplainOptions, lm: LoadedModel, layers: list[str], specs: Sequence[tgt.TargetSpec]) -> str:
    keys = ("method", "alpha", "colormap", "save_raw", "signed", "aug_smooth", "eigen_smooth", "per_layer",
            "score_channels", "channels", "image_size", "samples", "noise")
    shaping = {k: getattr(opts, k) for k in keys}
    shaping.update(model=lm.name, weights=lm.weights_sha256, layers=layers, classes=[str(s) for s in specs])
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


def explain(
    inputs: Sequence[str | Path],
    options: ExplainOptions | None = None,
    *,
    model: LoadedModel | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunResult:
    """Explain every image under ``inputs``; writes overlays and summary.json under ``options.out``.

    Everything that can be checked before work starts is checked first (UsageError, exit 2).
    Per-image failures are recorded in the summary and give exit code 3.
    """
    opts = options or ExplainOptions()
    opts.validate()
    methods = parse_methods(opts.method)
    cmap = resolve_colormap(opts.colormap or ("diverging" if opts.signed else "jet"))
    device = resolve_device(opts.device)
    out_dir = Path(opts.out)
    sources = select_shard(discover(inputs, opts.recursive, exclude=out_dir), opts.shard)
    check_writable(out_dir)
    lm = model or load_model(
        opts.model, opts.weights, opts.labels, unsafe_load=opts.unsafe_load, image_size=opts.image_size, device=device
    )
    # NHWC is markedly faster for convolutions on CPU (depthwise ones above all) and on CUDA.
    lm.module.to(device=device, memory_format=torch.channels_last)
    pre = Preprocess(lm.input_size, lm.mean, lm.std, lm.flexible_size)
    example = torch.zeros(1, 3, lm.input_size, lm.input_size, device=device)
    layers = choose_layers(lm.module, opts.layer, lm.name, example)
    specs = tgt.parse_class_specs(opts.classes, lm.labels, lm.num_classes)
    method_opts = MethodOptions(
        score_channels=opts.score_channels, perturbation_batch=opts.perturbation_batch, channels=opts.channels,
        smooth_samples=opts.samples, integration_steps=opts.samples, smooth_sigma=opts.noise, progress=not opts.quiet,
    )
    engine = CamEngine(
        lm.module, layers, methods, options=method_opts, signed=opts.signed, output_key=opts.output_key,
        per_layer=opts.per_layer, aug_smooth=opts.aug_smooth, eigen_smooth=opts.eigen_smooth, channels_last=True,
    )
    engine.prepare(example)
    class_suffix = not tgt.is_default(specs)
    fused_layer = "+".join(layers) if len(layers) > 1 else None
    stems = output_stems(sources)
    suffix = "" if opts.shard is None else ".shard-{}-of-{}".format(*parse_shard(opts.shard))
    journal = Journal(out_dir / f".camcli-journal{suffix}.jsonl", _fingerprint(opts, lm, layers, specs))

    records: list[dict[str, Any] | None] = [None] * len(sources)
    keys = [source_key(s) for s in sources]
    carried: dict[str, dict[str, Any]] = {}
    if opts.skip_existing:
        done = journal.completed()
        for i, key in enumerate(keys):
            rec = done.get(key)
            if rec is not None and outputs_exist(rec, out_dir):
                records[i] = rec
                carried[key] = rec
    todo = [i for i, r in enumerate(records) if r is None]
    if on_start is not None:
        on_start(len(todo))
    if progress is not None and len(todo) < len(sources):
        _warn(f"--skip-existing: {len(sources) - len(todo)} of {len(sources)} images already done")

    warned: set[str] = set()
    render = partial(
        render_outputs, out_dir=out_dir, model=lm, colormap=cmap, alpha=opts.alpha, signed=opts.signed,
        save_raw=opts.save_raw, class_suffix=class_suffix, fused_layer=fused_layer,
    )

    def write_one(i: int, rgb: np.ndarray, out: ImageOutput) -> None:
        """In a writer thread: render and write, then complete the record and journal it."""
        rec = records[i]
        assert rec is not None
        try:
            rec["explanations"] = render(rgb, out, stems[i])
        except OSError as e:
            rec.update(status="error", error=f"writing outputs failed: {e}")
            return
        journal.add(keys[i], rec)

    def run_group(group: list[dict[str, Any]], pool: WriterPool) -> bool:
        """Explain one same-shape group; False when --fail-fast should stop the run."""
        x = pre.normalize(torch.stack([g["tensor"] for g in group]).to(device, non_blocking=True))
        try:
            outs = engine.explain(x, specs)
        except UsageError:
            raise
        except (RuntimeError, ValueError) as e:
            for g in group:
                records[g["index"]] = {
                    "path": str(sources[g["index"]].path), "status": "error",
                    "error": f"model failed on this image: {str(e).splitlines()[0]}",
                }
            return not opts.fail_fast
        for g, o in zip(group, outs):
            i, rgb = g["index"], g["image"]
            _diagnose(sources[i].path, o, layers, warned)
            records[i] = {
                "path": str(sources[i].path),
                "width": int(rgb.shape[1]),
                "height": int(rgb.shape[0]),
                "status": "ok",
                "error": None,
                "input_size": list(g["tensor"].shape[-2:]),
                "predictions": prediction_entries(o.top, lm),
                "saturation": o.saturation,
                "explanations": [],
            }
            pool.submit(write_one, i, rgb, o)
        if progress is not None:
            progress(len(group))
        return True

    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ImageDataset(sources, pre), todo),
        batch_size=opts.batch_size,
        num_workers=auto_workers() if opts.workers is None else opts.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    journal.open(carried)
    try:
        with WriterPool(workers=2, max_pending=4 * opts.batch_size) as pool:
            # Images of one input shape are batched together; other shapes wait in their own bucket.
            pending: dict[tuple[int, ...], list[dict[str, Any]]] = defaultdict(list)
            running = True
            for items in loader:
                for item in items:
                    i = item["index"]
                    if item["error"] is not None:
                        records[i] = {"path": str(sources[i].path), "status": "error", "error": item["error"]}
                        if progress is not None:
                            progress(1)
                        running = running and not opts.fail_fast
                        continue
                    shape = tuple(item["tensor"].shape)
                    pending[shape].append(item)
                    if running and len(pending[shape]) >= opts.batch_size:
                        running = run_group(pending.pop(shape), pool)
                while running and sum(len(v) for v in pending.values()) > 2 * opts.batch_size:
                    largest = max(pending, key=lambda k: len(pending[k]))
                    running = run_group(pending.pop(largest), pool)
                if not running:
                    break
            for shape in list(pending):
                if not running:
                    break
                running = run_group(pending.pop(shape), pool)
            pool.drain()
    finally:
        journal.close()
    images = [r for r in records if r is not None]
    skipped = len(records) - len(images)
    options_record = {k: v for k, v in asdict(opts).items() if k not in ("extra", "quiet")}
    options_record["class"] = [str(s) for s in specs]
    options_record.pop("classes", None)
    options_record["method"] = [m.name for m in methods]
    options_record["layer"] = layers
    summary = build_summary(
        model=lm, layers=layers, device=str(device), options=options_record, input_policy=pre.policy, images=images
    )
    summary["counts"]["reused"] = len(carried)
    if skipped:
        summary["counts"]["not_processed"] = skipped
    summary_path = out_dir / f"summary{suffix}.json"
    write_summary(summary, summary_path)
    failed = any(r["status"] != "ok" for r in images) or skipped > 0
    return RunResult(summary=summary, exit_code=ExitCode.PARTIAL if failed else ExitCode.OK, summary_path=summary_path)


def _diagnose(path: Path, out: ImageOutput, layers: list[str], warned: set[str]) -> None:
    """Warn once per run about empty maps and saturated layers."""
    if "empty" not in warned and any(m.empty for m in out.maps):
        note = next(m.note for m in out.maps if m.empty)
        _warn(f"{path}: {note}")
        warned.add("empty")
    if "saturation" not in warned and out.saturation and out.saturation["share"] > SATURATION_WARN:
        _warn(
            f"{path}: {out.saturation['share']:.0%} of the bounded activations at or after layer "
            f"{','.join(layers)} are saturated; their gradients vanish, so gradient maps may be diffuse or "
            "empty (try an earlier layer or a gradient-free method)"
        )
        warned.add("saturation")
