"""`explain` as a plain function: inputs -> overlays, raw maps and summary.json.

Decoding runs in DataLoader workers, the engine computes a batch at a time, and a writer pool
upsamples, renders and writes while the next batch computes. Nothing is kept between batches but
the small per-image summary records.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from camcli import targets as tgt
from camcli.engine import CamMap, ImageOutput
from camcli.errors import ExitCode, UsageError
from camcli.images import ImageDataset, ImageSource, collate, find_images, worker_ignores_interrupts
from camcli.models import LoadedModel
from camcli.options import ExplainOptions, parse_shard
from camcli.render import channel_grid, encode_png, overlay_png, raw_npy, resolve_colormap
from camcli.report import build_summary, prediction_entries, write_summary
from camcli.session import Session, resolve_device  # noqa: F401  (resolve_device: public, used by callers)
from camcli.stats import image_map_stats, note_text
from camcli.writer import WriterPool, write_atomic

SATURATION_WARN = 0.25  # warn when more than this share of bounded units is saturated
# Decoded full-resolution pixels held at once by images waiting for their batch, and again by
# overlays waiting to be written: batches are cut short, and writes wait, beyond it. An image larger
# than the budget goes alone. Memory then follows the largest image, not image size x batch size.
PIXEL_BUDGET = 1 << 26  # 64 Mpx: 192 MB of RGB

__all__ = ["ExplainOptions", "RunResult", "explain"]


@dataclass
class RunResult:
    summary: dict[str, Any]
    exit_code: ExitCode
    summary_path: Path


def auto_workers() -> int:
    """Decoding workers when --workers is not given: none on 2 cores or fewer, else up to 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(4, cores // 2)


def shard_of(rel: Path, n: int) -> int:
    """The shard (1..n) an input belongs to: a stable hash of its relative path, the same on every machine."""
    digest = hashlib.sha1(rel.as_posix().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n + 1


def select_shard(sources: Sequence[ImageSource], spec: str | None) -> list[ImageSource]:
    if spec is None:
        return list(sources)
    k, n = parse_shard(spec)
    return [s for s in sources if shard_of(s.rel, n) == k]


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
        # Rendered a band of rows at a time: no full-resolution float map is ever held.
        layer_suffix = fused_layer is not None and m.layer != fused_layer
        rel_png = map_filename(stem, m, class_suffix=class_suffix, layer_suffix=layer_suffix, ext=".png")
        write_atomic(out_dir / rel_png, overlay_png(rgb, m.cam, colormap, alpha, signed))
        rel_raw = None
        if save_raw:
            rel_raw = map_filename(stem, m, class_suffix=class_suffix, layer_suffix=layer_suffix, ext=".npy")
            write_atomic(out_dir / rel_raw, raw_npy(m.cam, h, w))
        stats = image_map_stats(m.cam, h, w, m.empty)
        if m.note:
            stats["note"] = note_text(m.note)
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
    try:
        st = src.path.stat()
    except OSError:  # a broken link: the image fails, and nothing is reused for it
        return f"{src.rel.as_posix()}|unreadable"
    return f"{src.rel.as_posix()}|{st.st_size}|{st.st_mtime_ns}"


def outputs_exist(record: dict[str, Any], out_dir: Path) -> bool:
    if record.get("status") != "ok":
        return False
    files = [e[k] for e in record.get("explanations", []) for k in ("overlay", "raw") if e.get(k)]
    return bool(files) and all((out_dir / f).is_file() for f in files)


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
    cmap = resolve_colormap(opts.colormap or ("diverging" if opts.signed else "jet"))
    out_dir = Path(opts.out)
    found = find_images(inputs, opts.recursive, exclude=out_dir)
    sources = select_shard(found.sources, opts.shard)
    check_writable(out_dir)
    session = Session.open(opts, model=model)
    lm, device, pre, layers, specs = session.model, session.device, session.preprocess, session.layers, session.specs
    class_suffix = not tgt.is_default(specs)
    fused_layer = session.layer_name if len(layers) > 1 else None
    stems = output_stems(sources)
    suffix = "" if opts.shard is None else ".shard-{}-of-{}".format(*parse_shard(opts.shard))
    journal = Journal(out_dir / f".camcli-journal{suffix}.jsonl", session.fingerprint())

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
    if len(todo) < len(sources):
        session.warn(f"--skip-existing: {len(sources) - len(todo)} of {len(sources)} images already done")

    warned: set[str] = set()
    if found.skipped:
        session.warn(
            f"skipped {len(found.skipped)} folder entries that are not regular files (a FIFO, a socket or a broken "
            f"link), first: {found.skipped[0]}"
        )
    render = partial(
        render_outputs, out_dir=out_dir, model=lm, colormap=cmap, alpha=opts.alpha, signed=opts.signed,
        save_raw=opts.save_raw, class_suffix=class_suffix, fused_layer=fused_layer,
    )

    writing: list[tuple[Any, int]] = []  # (future, full-resolution pixels) of writes in flight

    def submit_write(pool: WriterPool, i: int, rgb: np.ndarray, out: ImageOutput) -> None:
        """Hand an image to the writers, first waiting for the oldest writes beyond the pixel budget."""
        pixels = rgb.shape[0] * rgb.shape[1]
        while writing and (writing[0][0].done() or sum(p for _, p in writing) + pixels > PIXEL_BUDGET):
            writing.pop(0)[0].result()
        writing.append((pool.submit(write_one, i, rgb, out), pixels))

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
        try:
            outs = session.explain(torch.stack([g["tensor"] for g in group]))
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
            i, rgb = g["index"], g.pop("image")  # the writer holds the only reference from here on
            _diagnose(sources[i].path, o, layers, warned, session.warn)
            if g["note"] and "note" not in warned:
                session.warn(f"{sources[i].path}: {g['note']}")
                warned.add("note")
            records[i] = {
                "path": str(sources[i].path),
                "width": int(rgb.shape[1]),
                "height": int(rgb.shape[0]),
                "status": "ok",
                "error": None,
                "input_size": list(g["tensor"].shape[-2:]),
                "predictions": prediction_entries(o.top, lm),
                "saturation": o.saturation,
                **({"note": g["note"]} if g["note"] else {}),
                "explanations": [],
            }
            submit_write(pool, i, rgb, o)
        if progress is not None:
            progress(len(group))
        return True

    # One image per fetch: batches are formed below, by input shape and under the pixel budget.
    workers = auto_workers() if opts.workers is None else opts.workers
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ImageDataset(sources, pre, opts.max_pixels), todo),
        batch_size=1,
        num_workers=workers,
        worker_init_fn=worker_ignores_interrupts if workers else None,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    journal.open(carried)
    try:
        with WriterPool(workers=2, max_pending=4 * opts.batch_size) as pool:
            # Images of one input shape are batched together; other shapes wait in their own bucket.
            # A bucket also runs early when the images waiting hold more than PIXEL_BUDGET pixels.
            pending: dict[tuple[int, ...], list[dict[str, Any]]] = defaultdict(list)

            def held(bucket: list[dict[str, Any]]) -> int:
                return sum(g["image"].shape[0] * g["image"].shape[1] for g in bucket)

            def held_total() -> int:
                return sum(held(v) for v in pending.values())

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
                    # A batch stays within the pixel budget (an image larger than it runs alone), and
                    # a full budget runs before the next image is decoded.
                    pixels = held([item])
                    while running and pending and held_total() + pixels > PIXEL_BUDGET:
                        running = run_group(pending.pop(max(pending, key=lambda k: held(pending[k]))), pool)
                    shape = tuple(item["tensor"].shape)
                    pending[shape].append(item)
                    if running and (len(pending[shape]) >= opts.batch_size or held_total() >= PIXEL_BUDGET):
                        running = run_group(pending.pop(shape), pool)
                items = item = None  # type: ignore[assignment]  # hold no image while the next decodes
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
    summary = build_summary(
        model=lm, layers=layers, device=str(device), options=session.record(), input_policy=pre.policy, images=images
    )
    summary["counts"]["reused"] = len(carried)
    if skipped:
        summary["counts"]["not_processed"] = skipped
    if found.skipped:
        summary["counts"]["skipped_entries"] = len(found.skipped)
    summary_path = out_dir / f"summary{suffix}.json"
    write_summary(summary, summary_path)
    failed = any(r["status"] != "ok" for r in images) or skipped > 0
    return RunResult(summary=summary, exit_code=ExitCode.PARTIAL if failed else ExitCode.OK, summary_path=summary_path)


def _diagnose(path: Path, out: ImageOutput, layers: list[str], warned: set[str], warn: Callable[[str], None]) -> None:
    """Warn once per run about empty maps and saturated layers."""
    if "empty" not in warned and any(m.empty for m in out.maps):
        m = next(m for m in out.maps if m.empty)
        warn(f"{path}: {note_text(m.note, m.method)}")
        warned.add("empty")
    if "saturation" not in warned and out.saturation and out.saturation["share"] > SATURATION_WARN:
        warn(
            f"{path}: {out.saturation['share']:.0%} of the bounded activations at or after layer "
            f"{','.join(layers)} are saturated; their gradients vanish, so gradient maps may be diffuse or "
            "empty (try an earlier layer or a gradient-free method)"
        )
        warned.add("saturation")
