"""`camcli check`: attention expectations for CI, with baselines and JUnit/JSON reports."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from xml.etree import ElementTree as ET

import cv2
import numpy as np
import torch

from camcli import jsonout
from camcli import targets as tgt
from camcli.checkfile import Case, CheckFile, CheckFileError, baseline_path, case_id, load_check_file
from camcli.errors import ExitCode, ImageError, UsageError
from camcli.feed import Batch, Decoder, feed
from camcli.images import ImageSource, decode
from camcli.models import LoadedModel
from camcli.models.labels import imagenet_labels, load_labels
from camcli.models.load import DEFAULT_MODEL
from camcli.outdir import check_writable, locked
from camcli.fullmap import baseline_pearson, baseline_problem, load_baseline, region_facts
from camcli.render import encode_png, overlay_image, overlay_png, raw_npy, resolve_colormap
from camcli.session import Session, stderr_warning
from camcli.writer import write_atomic

UNCHANGED = 0.9999  # --update-baselines: a map at least this similar to the stored one is "unchanged"


@dataclass
class RuleResult:
    case: str
    case_index: int
    method: str
    rule: str
    value: float | int | bool | str | None
    bound: float | int | bool | None
    passed: bool
    message: str = ""


@dataclass
class CheckReport:
    file: str
    model: str
    layer: str
    rules: list[RuleResult] = field(default_factory=list)
    baselines: list[dict[str, Any]] = field(default_factory=list)  # --update-baselines
    overlays: list[str] = field(default_factory=list)
    interrupted: str | None = None  # the signal that stopped the check before its last case
    not_run: int = 0  # cases it did not reach

    @property
    def passed(self) -> bool:
        return self.interrupted is None and all(r.passed for r in self.rules)

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.passed else ExitCode.CHECK_FAILED

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "model": self.model,
            "layer": self.layer,
            "passed": self.passed,
            "rules": [asdict(r) for r in self.rules],
            "baselines": self.baselines,
            "overlays": self.overlays,
            **({"interrupted": self.interrupted, "not_run": self.not_run} if self.interrupted else {}),
        }


class CheckStopped(KeyboardInterrupt):
    """A signal stopped the check: ``report`` holds the cases done, so the reports can still be
    written; ``cause`` is the interruption to raise on."""

    def __init__(self, report: CheckReport, cause: KeyboardInterrupt) -> None:
        super().__init__(str(cause))
        self.report = report
        self.cause = cause


def check_report_path(flag: str, path: str | Path) -> Path:
    """A report file (--junit, --json) that can be written, checked before any case runs: after
    the cases, a folder or a file in the way would turn passed checks into a crash."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {str(p)!r} is a folder; give a file name inside it (for example {str(p / 'report')!r})")
    folder = p.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent  # the nearest existing folder: the rest is created when writing
    if not folder.is_dir():
        raise UsageError(f"{flag} {str(p)!r}: {str(folder)!r} is a file, not a folder")
    try:  # a real probe: access() says yes for root, and for /proc, where nothing can be created
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".camcli-write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {str(p)!r}: cannot create a file in {str(folder)!r} ({e.strerror or e})") from None
    return p


def _prevalidate_classes(cf: CheckFile) -> None:
    """Label names can be checked before the model loads when the labels are known."""
    name = cf.options.model or DEFAULT_MODEL
    labels: list[str] | None = None
    if cf.options.labels:
        labels = load_labels(cf.options.labels)
    elif name in (DEFAULT_MODEL, "default"):
        labels = list(imagenet_labels())
    if labels is None:
        return
    for case in cf.cases:
        if case.spec is not None:
            try:
                tgt.parse_class_specs([case.spec], labels, len(labels))
            except UsageError as e:
                raise CheckFileError(f"{cf.path}: cases[{case.index}].class: {e}") from None


def _region_mask(case: Case, max_pixels: int) -> np.ndarray:
    """Boolean (H, W) mask of the expected region."""
    if case.expect.region_mask is not None:
        return decode(case.expect.region_mask, max_pixels).max(axis=2) > 0
    mask = np.zeros((case.height, case.width), bool)
    if case.expect.region is not None:
        x0, y0, x1, y1 = case.expect.region
        mask[y0:y1, x0:x1] = True
    return mask


def _draw_region(bgr: np.ndarray, case: Case, ok: bool, mask: np.ndarray | None) -> np.ndarray:
    color = (0, 200, 0) if ok else (0, 0, 255)
    thick = max(2, round(max(bgr.shape[:2]) / 200))
    if case.expect.region is not None:
        x0, y0, x1, y1 = case.expect.region
        cv2.rectangle(bgr, (x0, y0), (x1 - 1, y1 - 1), color, thick)
    elif mask is not None:
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(bgr, contours, -1, color, thick)
    return bgr


def run_check(
    path: str | Path,
    *,
    update_baselines: bool = False,
    out: str | Path | None = None,
    model: LoadedModel | None = None,
    overrides: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> CheckReport:
    """Run every case x method of a check file; see CheckReport.exit_code for the outcome.

    ``overrides``: option values from the command line, which win over the file's. While it runs,
    the check holds ``out`` (when given) for itself: another run into it exits 2. ``on_start``
    gets the number of cases once the model is loaded, ``progress`` 1 per case done.
    """
    hooks = dict(progress=progress, on_start=on_start)
    if out is None:
        return _run_check(path, update_baselines=update_baselines, out=None, model=model, overrides=overrides, **hooks)
    check_writable(Path(out))
    quiet = bool((overrides or {}).get("quiet"))
    with locked(Path(out), "camcli check", warn=None if quiet else stderr_warning):
        return _run_check(path, update_baselines=update_baselines, out=out, model=model, overrides=overrides, **hooks)


def _run_check(
    path: str | Path,
    *,
    update_baselines: bool,
    out: str | Path | None,
    model: LoadedModel | None,
    overrides: dict[str, Any] | None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> CheckReport:
    cf = load_check_file(path, require_baselines=not update_baselines, overrides=overrides)
    if update_baselines and cf.baselines is None:
        raise CheckFileError(f"{cf.path}: --update-baselines needs a top-level 'baselines' folder")
    _prevalidate_classes(cf)
    if out is not None:
        check_writable(Path(out))
    try:
        session = Session.open(cf.options, model=model)
    except CheckFileError:
        raise
    except UsageError as e:
        raise CheckFileError(f"{cf.path}: {e}") from None
    lm = session.model
    specs_by_case: dict[int, list[tgt.TargetSpec]] = {}
    # --reference / --target (top level, or the command line) explain one scalar for every case
    default: list[tgt.TargetSpec] = (list(session.specs) if any(isinstance(s, tgt.OUTPUT_SPECS) for s in session.specs)
                                     else [tgt.TopK(1)])
    for case in cf.cases:
        if case.reference is not None:
            try:  # its embedding, once per case, by the session's model
                specs_by_case[case.index] = [session.reference(str(case.reference))]
            except UsageError as e:
                raise CheckFileError(f"{cf.path}: cases[{case.index}].reference: {e}") from None
            continue
        try:
            specs_by_case[case.index] = (
                default if case.spec is None else tgt.parse_class_specs([case.spec], lm.labels, lm.num_classes)
            )
        except UsageError as e:
            raise CheckFileError(f"{cf.path}: cases[{case.index}].class: {e}") from None
    report = CheckReport(file=str(cf.path), model=lm.name, layer=session.layer_name)
    out_dir = Path(out) if out is not None else None

    if on_start is not None:
        on_start(len(cf.cases))
    try:
        _run_cases(cf, session, specs_by_case, report, update_baselines, out_dir, progress)
    except KeyboardInterrupt as e:
        done = len({r.case_index for r in report.rules} | {b["case_index"] for b in report.baselines})
        report.interrupted = getattr(e, "name", "SIGINT")
        report.not_run = len(cf.cases) - done
        raise CheckStopped(report, e) from None
    return report


def _run_cases(cf: CheckFile, session: Session, specs_by_case: dict[int, list[tgt.TargetSpec]], report: CheckReport,
               update_baselines: bool, out_dir: Path | None, progress: Callable[[int], None] | None) -> None:
    lm, layer_name, cmap = session.model, session.layer_name, resolve_colormap("jet")
    for case, rgb, tensor in _case_images(cf, session):
        result = session.explain_images(tensor[None], specs_by_case[case.index], [rgb.shape[:2]])[0]
        ranked = [i for i, _ in result.top]
        mask = _region_mask(case, cf.options.max_pixels) if (case.expect.region or case.expect.region_mask) else None
        for cam_map in result.maps:
            if cam_map.layer != layer_name:
                continue
            # The map at feature resolution; every rule reads it upsampled to the image a band at a time.
            cam = cam_map.cam
            rows = _rule_results(case, cam_map.method, cam_map.target, cam, ranked, lm, mask, cf, layer_name)
            if update_baselines:
                assert cf.baselines is not None
                report.baselines.append(_store_baseline(cf, case, cam_map.method, cam, rgb, cmap, lm.name, layer_name))
            else:
                report.rules.extend(rows)
            if out_dir is not None:
                ok = all(r.passed for r in rows)
                bgr = _draw_region(overlay_image(rgb, cam, cmap, 0.5), case, ok, mask)
                rel = f"{case_id(case)}.{cam_map.method.replace('+', 'p')}.png"
                write_atomic(out_dir / rel, encode_png(bgr))
                report.overlays.append(rel)
        if progress is not None:
            progress(1)


def _case_images(cf: CheckFile, session: Session) -> Iterator[tuple[Case, np.ndarray, torch.Tensor]]:
    """Each case with its image (full resolution) and model input, through the feed one at a time in
    the file's order (each case has its own class); an unreadable image stops the check (ImageError)."""
    images = [ImageSource(Path(case.image), Path(Path(case.image).name)) for case in cf.cases]
    decoded = feed(images, Decoder(session.preprocess, cf.options.max_pixels), 1)
    try:
        for case, got in zip(cf.cases, decoded):
            if not isinstance(got, Batch):
                raise ImageError(got.error or str(case.image))
            item = got.items[0]
            assert item.image is not None and item.tensor is not None
            yield case, item.image, item.tensor
    finally:
        decoded.close()  # the decoding workers stop on every path


def _rank_of(target: int | None, ranked: list[int]) -> int:
    if target is None:
        return 1
    return ranked.index(target) + 1 if target in ranked else len(ranked) + 1


def _rule_results(
    case: Case,
    method: str,
    target: int | None,
    cam: np.ndarray,
    ranked: list[int],
    lm: LoadedModel,
    mask: np.ndarray | None,
    cf: CheckFile,
    layer: str,
) -> list[RuleResult]:
    """The case's expectations applied to one map: one RuleResult per rule it states."""
    ex = case.expect
    rows: list[RuleResult] = []

    def add(rule: str, value: Any, bound: Any, passed: bool, message: str = "") -> None:  # noqa: ANN401
        rows.append(RuleResult(case.name, case.index, method, rule, value, bound, bool(passed), message))

    if ex.top_k is not None:
        rank = _rank_of(target, ranked)
        shown = f"rank {rank}" if rank <= len(ranked) else f"not in top {len(ranked)}"
        label = lm.label(target) if target is not None else None
        add("top_k", rank, ex.top_k, rank <= ex.top_k, f"class {target} ({label}): {shown}")
    if mask is not None:
        facts = region_facts(cam, mask)
        total = facts.total
        if ex.min_energy_in_region is not None:
            share = facts.inside / total if total > 0 else 0.0
            add("min_energy_in_region", round(share, 6), ex.min_energy_in_region, share >= ex.min_energy_in_region,
                "" if total > 0 else "the map is empty")
        if ex.peak_in_region is not None:
            px, py = facts.peak
            inside = facts.peak_inside and total > 0
            add("peak_in_region", inside, ex.peak_in_region, inside == ex.peak_in_region, f"peak at ({px}, {py})")
    if ex.min_baseline_similarity is not None and cf.baselines is not None:
        b = baseline_path(cf.baselines, case, method)
        meta_path = b.with_suffix(".json")
        base = load_baseline(b)  # a memory map: read a band at a time
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if base is None:
            add("min_baseline_similarity", None, ex.min_baseline_similarity, False,
                f"baseline {b} is missing; run `camcli check {cf.path} --update-baselines`")
        elif base.shape != (case.height, case.width):
            add("min_baseline_similarity", None, ex.min_baseline_similarity, False,
                f"baseline is {base.shape[1]}x{base.shape[0]}, the map {case.width}x{case.height}")
        else:
            r = baseline_pearson(cam, base)
            note = ""
            if meta.get("layer") not in (None, layer):
                note = f"baseline was made at layer {meta['layer']}, this run uses {layer}"
            add("min_baseline_similarity", round(r, 6), ex.min_baseline_similarity, r >= ex.min_baseline_similarity, note)
    return rows


def _store_baseline(
    cf: CheckFile, case: Case, method: str, cam: np.ndarray, rgb: np.ndarray, cmap: Any, model: str, layer: str  # noqa: ANN401
) -> dict[str, Any]:
    assert cf.baselines is not None
    b = baseline_path(cf.baselines, case, method)
    status, sim = "new", None
    # A baseline that cannot be read (truncated, not finite) is replaced, like one that changed.
    old = load_baseline(b) if b.is_file() and baseline_problem(b) is None else None
    if b.is_file() and old is None:
        status = "changed"
    if old is not None:
        sim = round(baseline_pearson(cam, old), 6) if old.shape == (case.height, case.width) else None
        status = "unchanged" if sim is not None and sim >= UNCHANGED else "changed"
        del old  # the memory map, before the file is replaced
    write_atomic(b, bytes(raw_npy(cam, case.height, case.width)))
    meta = {"model": model, "layer": layer, "method": method, "case": case.name, "image": str(case.image)}
    write_atomic(b.with_suffix(".json"), (jsonout.dumps(meta, indent=2) + "\n").encode())
    write_atomic(b.with_suffix(".png"), overlay_png(rgb, cam, cmap, 0.5))
    return {"case": case.name, "case_index": case.index, "method": method, "status": status,
            "similarity_to_previous": sim, "path": str(b)}


def junit_xml(report: CheckReport) -> bytes:
    """One <testcase> per case x method; a <failure> lists the rules that failed."""
    groups: dict[tuple[int, str], list[RuleResult]] = {}
    for r in report.rules:
        groups.setdefault((r.case_index, r.method), []).append(r)
    failures = sum(1 for rows in groups.values() if not all(r.passed for r in rows))
    stopped = report.interrupted is not None
    suite = ET.Element("testsuite", name="camcli check", tests=str(len(groups) + stopped), failures=str(failures),
                       errors=str(int(stopped)))
    for (_, method), rows in groups.items():
        tc = ET.SubElement(suite, "testcase", classname=f"camcli.check.{report.layer}", name=f"{rows[0].case} [{method}]")
        failed = [r for r in rows if not r.passed]
        lines = [f"{r.rule}: value {r.value} bound {r.bound} {'pass' if r.passed else 'FAIL'} {r.message}".rstrip() for r in rows]
        if failed:
            f = ET.SubElement(tc, "failure", message="; ".join(f"{r.rule} {r.value} (bound {r.bound})" for r in failed))
            f.text = "\n".join(lines)
        else:
            ET.SubElement(tc, "system-out").text = "\n".join(lines)
    if stopped:  # the cases not reached are not passes
        tc = ET.SubElement(suite, "testcase", classname=f"camcli.check.{report.layer}", name="interrupted")
        ET.SubElement(tc, "error", message=f"stopped by {report.interrupted}; {report.not_run} cases not run")
    root = ET.Element("testsuites")
    root.append(suite)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
