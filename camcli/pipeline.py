"""`explain` as a plain function: inputs -> overlays, raw maps, records.jsonl and summary.json.

Decoding runs in DataLoader workers, the engine computes a batch at a time, and a writer pool
upsamples, renders and writes while the next batch computes. Each finished image's record is
appended to records.jsonl and counted; nothing of it is kept in memory, so memory stays flat
however many images a run has.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from camcli import targets as tgt
from camcli.engine import CamMap, ImageOutput
from camcli.errors import ExitCode, OutputError, UsageError
from camcli.images import (
    ImageDataset, ImageSource, collate, find_images, skipped_warning, stack_images, worker_ignores_interrupts,
)
from camcli.models import LoadedModel
from camcli.options import ExplainOptions, parse_shard
from camcli.outdir import check_writable, locked
from camcli.render import channel_grid, encode_png, overlay_png, raw_npy, resolve_colormap
from camcli.records import (
    RecordStream, build_summary, iter_records, output_files, plan_name, read_header, records_name, sorted_records,
    summary_name, with_records, write_plan, write_summary,
)
from camcli.report import SHARE_KEY, prediction_entries, run_header
from camcli.session import Session, resolve_device, stderr_warning  # noqa: F401  (resolve_device: public, used by callers)
from camcli.stats import image_map_stats, note_text
from camcli.writer import WriterPool
from camcli.writer import write_atomic as _write_atomic

SATURATION_WARN = 0.25  # warn when more than this share of bounded units is saturated
# Decoded full-resolution pixels held at once by images waiting for their batch, and again by
# overlays waiting to be written: batches are cut short, and writes wait, beyond it. An image larger
# than the budget goes alone. Memory then follows the largest image, not image size x batch size.
PIXEL_BUDGET = 1 << 26  # 64 Mpx: 192 MB of RGB

__all__ = ["ExplainOptions", "RunResult", "explain"]


@dataclass
class RunResult:
    """What a run wrote. ``summary`` is summary.json as written: header, counts and aggregates.
    The per-image records are in ``records_path`` (records.jsonl): ``records()`` streams them,
    ``images`` lists them all, ``with_records()`` is the summary with them (what ``--json`` prints)."""

    summary: dict[str, Any]
    exit_code: ExitCode
    summary_path: Path
    records_path: Path

    def records(self) -> Iterator[dict[str, Any]]:
        """This run's records in the order they finished, read from records.jsonl (constant memory)."""
        header = read_header(self.records_path)
        if header.get("run_id") != self.summary.get("run_id"):
            raise UsageError(f"{self.records_path} now holds the records of another run ({header.get('run_id')})")
        return iter_records(self.records_path)

    @property
    def images(self) -> list[dict[str, Any]]:
        """Every record of this run, ordered by relative path."""
        return sorted_records(self.records())

    def with_records(self) -> dict[str, Any]:
        return with_records(self.summary, self.records())


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and job schedulers set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_workers() -> int:
    """Decoding workers when --workers is not given: none on 2 cores or fewer, else up to 4."""
    cores = available_cores()
    return 0 if cores <= 2 else min(4, cores // 2)


def writer_threads(decoders: int) -> int:
    """Threads that render, measure and write while the engine computes: the cores left after the
    decoding processes and the main thread, at least 2 and at most 32. OpenCV, zlib and numpy release
    the GIL for that work, so the threads run in parallel."""
    return max(2, min(32, available_cores() - decoders - 1))


def writer_queue(batch_size: int, threads: int) -> int:
    """Images waiting for a writer thread at most: a few batches, and enough to keep every thread busy.
    The pixel budget bounds the same queue by size (see _run's submit_write)."""
    return max(4 * batch_size, 2 * threads)


def shard_of(rel: Path, n: int) -> int:
    """The shard (1..n) an input belongs to: a stable hash of its relative path, the same on every machine."""
    digest = hashlib.sha1(rel.as_posix().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n + 1


def select_shard(sources: Sequence[ImageSource], spec: str | None) -> list[ImageSource]:
    if spec is None:
        return list(sources)
    k, n = parse_shard(spec)
    return [s for s in sources if shard_of(s.rel, n) == k]


def output_stems(sources: Sequence[ImageSource], universe: Sequence[ImageSource] | None = None) -> list[Path]:
    """The output stem of each source: unique in the run, and the same in every run and shard of it.

    The stem mirrors the input tree: ``sub/cat.jpg`` -> ``sub/cat``. Names that collide (compared
    without case, for case-insensitive file systems) step up together, until none does: the name
    with its suffix (``a.jpg``, ``a.png``), then that name and ``-`` and 8 hex digits of the SHA-1
    of the relative path (``y.jpg`` and ``y.jpg.png`` both want ``y.jpg``), then 16. The rule reads
    only relative paths and is decided over ``universe`` (every input found, default ``sources``), so
    each shard of a job array, and each rerun with --skip-existing, names an image alike.
    """
    everyone = list(universe) if universe is not None else list(sources)
    level = {s.rel: 0 for s in everyone}
    while True:
        groups: dict[str, list[Path]] = {}
        for rel in level:
            groups.setdefault(_stem_at(rel, level[rel]).as_posix().casefold(), []).append(rel)
        clashes = [rel for group in groups.values() if len(group) > 1 for rel in group]
        if not clashes:
            break
        for rel in clashes:
            level[rel] += 1
    return [_stem_at(s.rel, level[s.rel]) for s in sources]


def _stem_at(rel: Path, level: int) -> Path:
    if level == 0:
        return rel.parent / rel.stem
    if level == 1:
        return rel.parent / rel.name
    digest = hashlib.sha1(rel.as_posix().encode("utf-8")).hexdigest()
    return rel.parent / f"{rel.name}-{digest[:8 if level == 2 else 16 if level == 3 else 40]}"


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
    written: list[Path] | None = None,
) -> list[dict[str, Any]]:
    """Upsample each map to the image, write overlay (and raw) atomically, return summary entries.

    ``written`` collects the path of each file as it is written: when a later one fails, the
    caller removes them (see ImageWriter.write).
    """

    def write_atomic(path: Path, data: bytes) -> None:
        _write_atomic(path, data)
        if written is not None:
            written.append(path)

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
                SHARE_KEY[model.task]: None if m.probability is None else round(m.probability, 6),
            }
        if m.region is not None and target is not None:
            target["region"] = m.region
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


def remove_files(paths: Sequence[Path]) -> None:
    for p in paths:
        try:
            p.unlink()
        except OSError:
            pass


def source_key(src: ImageSource) -> str:
    try:
        st = src.path.stat()
    except OSError:  # a broken link: the image fails, and nothing is reused for it
        return f"{src.rel.as_posix()}|unreadable"
    return f"{src.rel.as_posix()}|{st.st_size}|{st.st_mtime_ns}"


def outputs_exist(record: dict[str, Any], out_dir: Path) -> bool:
    if record.get("status") != "ok":
        return False
    files = output_files(record)
    return bool(files) and all((out_dir / f).is_file() for f in files)


def explain(
    inputs: Sequence[str | Path],
    options: ExplainOptions | None = None,
    *,
    model: LoadedModel | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunResult:
    """Explain every image under ``inputs``; writes overlays, records.jsonl and summary.json under ``options.out``.

    Everything that can be checked before work starts is checked first (UsageError, exit 2).
    Per-image failures are recorded and give exit code 3; a write that fails stops the run (exit 4).
    """
    opts = options or ExplainOptions()
    opts.validate()
    resolve_colormap(opts.colormap or ("diverging" if opts.signed else "jet"))  # a bad name: exit 2 before work
    out_dir = Path(opts.out)
    found = find_images(inputs, opts.recursive, exclude=out_dir)
    sources = select_shard(found.sources, opts.shard)
    check_writable(out_dir)
    if opts.ray is not None:
        from camcli.ray_runner import require_ray

        require_ray()
        if model is not None:
            raise UsageError("--ray: each Ray actor loads the model from --model; call explain() without model=")
    shard = parse_shard(opts.shard) if opts.shard is not None else None
    lock = locked(out_dir, "camcli explain", shard, warn=None if opts.quiet else stderr_warning)
    try:
        plan = Plan(sources, len(found.sources), shard, skipped=list(found.skipped),
                    stems=output_stems(sources, found.sources))
        if opts.ray is not None:
            from camcli.ray_runner import explain_on_ray

            return explain_on_ray(opts, plan, out_dir, progress=progress, on_start=on_start)
        session = Session.open(opts, model=model)
        return _run(session, plan, out_dir, progress=progress, on_start=on_start)
    finally:
        lock.release()


@dataclass
class Plan:
    """The inputs of one run (one shard's share of those found), and where its records go."""

    sources: list[ImageSource]
    total: int  # inputs found before sharding
    shard: tuple[int, int] | None = None
    skipped: list[str] = field(default_factory=list)  # folder entries that are no regular files
    stems: list[Path] | None = None  # output stems of ``sources``, decided over every input found

    @property
    def inputs(self) -> dict[str, Any]:
        """The header's ``inputs``."""
        return {
            "total": self.total, "selected": len(self.sources), "plan": plan_name(self.shard),
            "shard": None if self.shard is None else "{}/{}".format(*self.shard),
            **({"skipped_entries": len(self.skipped)} if self.skipped else {}),
        }


def open_records(
    session: Session, plan: Plan, out_dir: Path, keys: Sequence[str], device: str | None = None
) -> tuple[RecordStream, set[str]]:
    """Write the plan, start the records stream (reusing an earlier run's records with
    --skip-existing) and remove the summary an earlier run left; returns the stream and the keys reused."""
    lm = session.model
    header = run_header(
        model=lm, layers=session.layers, device=device or str(session.device), options=session.record(),
        input_policy=session.preprocess.policy, shaping=session.shaping(), fingerprint=session.fingerprint(),
        inputs=plan.inputs,
    )
    write_plan(out_dir / plan_name(plan.shard), (s.rel.as_posix() for s in plan.sources))
    stream = RecordStream(out_dir / records_name(plan.shard), header)
    reuse = None
    if isinstance(session.options, ExplainOptions) and session.options.skip_existing:
        wanted = set(keys)

        def reuse(rec: dict[str, Any]) -> bool:
            return rec.get("key") in wanted and outputs_exist(rec, out_dir)

    summary_path = out_dir / summary_name(plan.shard)
    # from the swap on, an older run's summary would describe another run
    reused = stream.open(reuse, before_swap=lambda: summary_path.unlink(missing_ok=True))
    if (bad := stream.bad.warning()) is not None:
        session.warn(bad)
    return stream, reused


def identity(src: ImageSource, key: str) -> dict[str, Any]:
    """The fields that name an input in its record."""
    return {"path": str(src.path), "rel": src.rel.as_posix(), "key": key}


def error_record(ident: dict[str, Any], error: str) -> dict[str, Any]:
    return {**ident, "status": "error", "error": error}


class ImageWriter:
    """What a session does with one image's maps: its files under ``out_dir`` and its record.
    The local run and each Ray actor hold one."""

    def __init__(self, session: Session, out_dir: Path) -> None:
        opts, layers = session.options, session.layers
        self.session = session
        self.out_dir = out_dir
        self.render = partial(
            render_outputs, out_dir=out_dir, model=session.model,
            colormap=resolve_colormap(opts.colormap or ("diverging" if opts.signed else "jet")), alpha=opts.alpha,
            signed=opts.signed, save_raw=opts.save_raw, class_suffix=not tgt.is_default(session.specs),
            fused_layer=session.layer_name if len(layers) > 1 else None,
        )
        self.warned: set[str] = set()

    def explain(
        self, tensors: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[ImageOutput] | str:
        """Maps for one group of same-shape inputs, or why the model failed on them. ``sizes``: each
        image's original (H, W), for a segmentation --region in image pixels."""
        try:
            return self.session.explain(stack_images(tensors, self.session.device), sizes=sizes)
        except UsageError:
            raise
        except (RuntimeError, ValueError) as e:
            return f"model failed on this image: {str(e).splitlines()[0]}"

    def record(
        self, ident: dict[str, Any], rgb: np.ndarray, tensor: torch.Tensor, out: ImageOutput, note: str | None = None
    ) -> dict[str, Any]:
        """The record of an explained image, before its files are written (warns once about blank maps
        and about ``note``: an animated or multi-page file read at its first frame)."""
        _diagnose(Path(ident["path"]), out, self.session.layers, self.warned, self.session.warn)
        if note and "note" not in self.warned:
            self.session.warn(f"{ident['path']}: {note}")
            self.warned.add("note")
        return {
            **ident,
            "width": int(rgb.shape[1]),
            "height": int(rgb.shape[0]),
            "status": "ok",
            "error": None,
            "input_size": list(tensor.shape[-2:]),
            "predictions": prediction_entries(out.top, self.session.model),
            "saturation": out.saturation,
            **({"note": note} if note else {}),
            "explanations": [],
        }

    def write(self, rec: dict[str, Any], rgb: np.ndarray, out: ImageOutput, stem: Path) -> dict[str, Any]:
        """Write the image's files into its record. All or nothing: when a write fails (OutputError),
        the files this image already wrote are removed, so no output of an unlisted image stays."""
        written: list[Path] = []
        try:
            rec["explanations"] = self.render(rgb, out, stem, written=written)
        except BaseException:
            remove_files(written)
            raise
        return rec


def finish(stream: RecordStream, summary_path: Path, body: Callable[[], None], planned: int) -> RunResult:
    """Run ``body`` (which appends records to ``stream``), then write the summary of what finished.

    Interrupted (Ctrl-C) or stopped by an output error, the summary still describes this run: the
    images whose files are all on disk, marked interrupted; the output error names what to do next.
    """
    try:
        body()
    except BaseException as e:
        stream.close()  # writes still running have finished: the writer pool waited for them
        try:
            _summarize(stream, summary_path, interrupted=True, error=str(e) if isinstance(e, OutputError) else None)
            wrote = f"{summary_path} counts them"
        except OutputError:  # the disk is full: no summary (the old one is gone) rather than a wrong one
            wrote = f"no summary could be written; `camcli summary {summary_path.parent}` rebuilds it"
        if isinstance(e, OutputError):
            raise OutputError(f"{e}; stopped after {stream.tally.images} of {planned} images ({stream.path} lists "
                              f"them, {wrote}); make room and rerun with --skip-existing to do the rest") from None
        raise
    stream.close()
    summary = _summarize(stream, summary_path, interrupted=False)
    c = summary["counts"]
    code = ExitCode.PARTIAL if c["error"] > 0 or c.get("not_processed", 0) > 0 else ExitCode.OK
    return RunResult(summary=summary, exit_code=code, summary_path=summary_path, records_path=stream.path)


def _summarize(stream: RecordStream, path: Path, *, interrupted: bool, error: str | None = None) -> dict[str, Any]:
    """The summary of what finished: the records stream holds only images whose files are all on disk."""
    summary = build_summary(stream.header, stream.tally, records=stream.path.name, interrupted=interrupted, error=error)
    write_summary(summary, path)
    return summary


def _run(
    session: Session,
    plan: Plan,
    out_dir: Path,
    *,
    progress: Callable[[int], None] | None,
    on_start: Callable[[int], None] | None,
) -> RunResult:
    """The run itself, while this process holds the output folder."""
    opts = session.options
    sources = plan.sources
    stems = plan.stems if plan.stems is not None else output_stems(sources)
    keys = [source_key(s) for s in sources]
    stream, reused = open_records(session, plan, out_dir, keys)
    todo = [i for i, k in enumerate(keys) if k not in reused]
    if on_start is not None:
        on_start(len(todo))
    if reused:
        session.warn(f"--skip-existing: {len(reused)} of {len(sources)} images already done")
    writer = ImageWriter(session, out_dir)
    if (skipped := skipped_warning(plan.skipped)) is not None:
        session.warn(skipped)
    writing: list[tuple[Any, int]] = []  # (future, full-resolution pixels) of writes in flight

    def submit_write(pool: WriterPool, i: int, rec: dict[str, Any], rgb: np.ndarray, out: ImageOutput) -> None:
        """Hand an image to the writers, first waiting for the oldest writes beyond the pixel budget."""
        pixels = rgb.shape[0] * rgb.shape[1]
        while writing and (writing[0][0].done() or sum(p for _, p in writing) + pixels > PIXEL_BUDGET):
            writing.pop(0)[0].result()
        writing.append((pool.submit(write_one, i, rec, rgb, out), pixels))

    def write_one(i: int, rec: dict[str, Any], rgb: np.ndarray, out: ImageOutput) -> None:
        """In a writer thread: render and write, then append the finished record."""
        writer.write(rec, rgb, out, stems[i])  # OutputError: nothing of this image stays
        try:
            stream.add(rec)
        except OutputError:
            remove_files([out_dir / f for f in output_files(rec)])
            raise

    def run_group(group: list[dict[str, Any]], pool: WriterPool) -> bool:
        """Explain one same-shape group; False when --fail-fast should stop the run."""
        pool.check()  # a write failed: stop now
        outs = writer.explain([g["tensor"] for g in group], [g["image"].shape[:2] for g in group])
        if isinstance(outs, str):
            for g in group:
                stream.add(error_record(identity(sources[g["index"]], keys[g["index"]]), outs))
            return not opts.fail_fast
        for g, o in zip(group, outs):
            i, rgb = g["index"], g.pop("image")  # the writer holds the only reference from here on
            rec = writer.record(identity(sources[i], keys[i]), rgb, g["tensor"], o, g.get("note"))
            submit_write(pool, i, rec, rgb, o)
        if progress is not None:
            progress(len(group))
        return True

    # One image per fetch: batches are formed below, by input shape and under the pixel budget.
    workers = auto_workers() if opts.workers is None else opts.workers
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ImageDataset(sources, session.preprocess, opts.max_pixels), todo),
        batch_size=1,
        num_workers=workers,
        worker_init_fn=worker_ignores_interrupts if workers else None,
        collate_fn=collate,
        pin_memory=False,  # stack_images builds each batch in page-locked memory on CUDA: one copy, not two
    )
    threads = writer_threads(workers)

    def body() -> None:
        # Bounded twice: by count (writer_queue) and by decoded pixels (PIXEL_BUDGET, in submit_write).
        with WriterPool(workers=threads, max_pending=writer_queue(opts.batch_size, threads)) as pool:
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
                        stream.add(error_record(identity(sources[i], keys[i]), item["error"]))
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

    return finish(stream, out_dir / summary_name(plan.shard), body, len(sources))


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
