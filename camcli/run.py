"""The run layer: what every explain run does, whichever runner does the work.

The plan (the inputs and where their records go), the records stream and its reuse under
``--skip-existing``, the run's warnings, the :class:`ImageWriter` (one image's files and record) and
:func:`finish` (a summary on every path). The local runner (camcli/local_runner.py) and the Ray
runner (camcli/ray_runner.py) build on it; camcli/pipeline.py chooses between them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from camcli import targets as tgt
from camcli.engine import CamMap, ImageOutput
from camcli.errors import ExitCode, OutputError, UsageError
from camcli.feed import Inputs
from camcli.images import ImageSource, skipped_warning, stack_images
from camcli.models import LoadedModel
from camcli.models.clip import is_clip
from camcli.options import ExplainOptions
from camcli.records import (
    RecordStream, build_summary, iter_records, output_files, plan_name, read_header, records_name, sorted_records,
    summary_name, with_records, write_plan, write_summary,
)
from camcli.render import channel_grid, encode_png, overlay_png, raw_npy, resolve_colormap
from camcli.report import SHARE_KEY, prediction_entries, run_header
from camcli.session import Session
from camcli.stats import image_map_stats, note_text
from camcli.writer import write_atomic as _write_atomic

SATURATION_WARN = 0.25  # warn when more than this share of bounded units is saturated


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
    elif class_suffix and m.explained is not None and m.explained.get("kind") == "not":
        parts.append(f"not{m.explained['index']}")  # beside class K's own map, if both are asked for
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
    value_key: str | None = None,
) -> list[dict[str, Any]]:
    """Upsample each map to the image, write overlay (and raw) atomically, return summary entries.
    ``value_key``: what a target's number is called (Session.value_key; default by the model's task).

    ``written`` collects the path of each file as it is written: when a later one fails, the
    caller removes them (see ImageWriter.write).
    """

    def write_atomic(path: Path, data: bytes) -> None:
        _write_atomic(path, data)
        if written is not None:
            written.append(path)

    h, w = rgb.shape[:2]
    prompts = is_clip(model.module) and bool(getattr(model.module, "prompts", ()))
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
                value_key or SHARE_KEY[model.task]: None if m.probability is None else round(m.probability, 6),
            }
        if target is not None and prompts:  # zero-shot classes of a CLIP-style model: the class is a prompt
            target = {"kind": "text", "prompt": target["label"], **target}
        if m.region is not None and target is not None:
            target["region"] = m.region
        if m.explained is not None:  # no class: what was explained, and its value
            target = {**m.explained, "value": None if m.score is None else round(m.score, 6)}
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


@dataclass
class Plan(Inputs):
    """The inputs of one run (one shard's share of those found), and where its records go."""

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


@dataclass
class Run:
    """A run under way: its plan, its records stream, and which inputs are left to do."""

    session: Session  # the session that records the run (the Ray runner's is the driver's)
    plan: Plan
    out_dir: Path
    stream: RecordStream
    keys: list[str]  # each input's source key (path, size, mtime): what --skip-existing matches
    stems: list[Path]  # each input's output path without suffix
    todo: list[int]  # the inputs not reused from an earlier run, by index into plan.sources

    @property
    def summary_path(self) -> Path:
        return self.out_dir / summary_name(self.plan.shard)

    def ident(self, i: int) -> dict[str, Any]:
        """The fields that name input ``i`` in its record."""
        return identity(self.plan.sources[i], self.keys[i])

    def finish(self, body: Callable[[], None]) -> RunResult:
        """Run ``body`` (which appends records to the stream), then write the summary; see :func:`finish`."""
        return finish(self.stream, self.summary_path, body, len(self.plan.sources))


def start_run(
    session: Session, plan: Plan, out_dir: Path, *, device: str | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Run:
    """Everything before the first image, the same for every runner: the plan and the records stream
    written, earlier records reused (--skip-existing), ``on_start(images to do)``, and the warnings
    about reused images and skipped folder entries."""
    sources = plan.sources
    keys = [source_key(s) for s in sources]
    stream, reused = open_records(session, plan, out_dir, keys, device)
    run = Run(session, plan, out_dir, stream, keys, plan.stems if plan.stems is not None else output_stems(sources), [i for i, k in enumerate(keys) if k not in reused])
    if on_start is not None:
        on_start(len(run.todo))
    if reused:
        session.warn(f"--skip-existing: {len(reused)} of {len(sources)} images already done")
    if (skipped := skipped_warning(plan.skipped)) is not None:
        session.warn(skipped)
    return run


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
            fused_layer=session.layer_name if len(layers) > 1 else None, value_key=session.value_key,
        )
        self.warned: set[str] = set()

    def maps_or_error(
        self, tensors: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[ImageOutput] | str:
        """Maps for one group of same-shape inputs, or why the model failed on them. ``sizes``: each
        image's original (H, W), for a segmentation --region in image pixels."""
        try:
            return self.session.explain_images(stack_images(tensors, self.session.device), sizes=sizes)
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
            "predictions": prediction_entries(out.top, self.session.model, self.session.value_key),
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
