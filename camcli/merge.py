"""`camcli merge`: the records of several shards (or runs) -> one records.jsonl and summary.json.

Shards must come from one run: every option that shapes the outputs (the header's ``shaping``)
must agree, and the first that differs is named. Images that no shard recorded (from the shards'
plan files) and images recorded by more than one shard are reported; the first record of an image
is kept. Records stream through: nothing is held per image but its relative path.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from camcli import options as O
from camcli.errors import ExitCode, UsageError
from camcli.outdir import check_writable, locked
from camcli.writer import cannot_write
from camcli.records import (
    BadLines, RecordStream, build_summary, iter_records, plan_name, read_header, read_plan, records_name, shard_of_name,
    summary_name, write_plan, write_summary,
)

SHOWN = 10  # paths named in messages and in the summary's merge report


@dataclass
class MergeResult:
    summary: dict[str, Any]
    exit_code: ExitCode
    summary_path: Path
    records_path: Path
    missing: list[str] = field(default_factory=list)  # planned by a shard, recorded by none
    duplicates: list[str] = field(default_factory=list)  # recorded by more than one shard
    absent_shards: list[str] = field(default_factory=list)  # K/N of a job array with no records file
    warnings: list[str] = field(default_factory=list)  # unreadable lines skipped in the shards


def shard_files(out: Path, shards: Sequence[Path]) -> list[Path]:
    """The records files to merge: those named (files, or every records*.jsonl in a folder), or
    the shard records in ``out``."""
    found: list[Path] = []
    for s in shards:
        s = Path(s)
        if s.is_file():
            found.append(s)
        elif s.is_dir():
            here = sorted(s.glob("records.shard-*-of-*.jsonl")) or sorted(s.glob(records_name()))
            if not here:
                raise UsageError(f"{str(s)!r} holds no records.jsonl or records.shard-K-of-N.jsonl")
            found.extend(here)
        else:
            raise UsageError(f"no such folder or records file: {str(s)!r}")
    if not shards:
        found = sorted(Path(out).glob("records.shard-*-of-*.jsonl"), key=lambda p: shard_of_name(p.name) or (0, 0))
        if not found:
            raise UsageError(
                f"{str(out)!r} holds no shard records (records.shard-K-of-N.jsonl): run `camcli explain ... "
                "--shard K/N --out` into it, or name the shards' folders after it"
            )
    named: dict[Path, Path] = {}
    for p in found:
        first = named.setdefault(p.resolve(), p)
        if first is not p:
            same = f"{str(first)!r} twice" if str(first) == str(p) else f"{str(first)!r} and {str(p)!r}, which are one file"
            raise UsageError(f"the shards name {same}: name each folder or records file once")
    return list(named.values())


def _flag(key: str) -> str:
    o = O.BY_NAME.get(key)
    return o.flag if o is not None else key


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first shaping key (in sorted order) whose value differs, or None."""
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key
    return None


def check_same_run(headers: list[tuple[Path, dict[str, Any]]]) -> None:
    """UsageError naming the first option in which a shard differs from the first shard."""
    (p0, h0), rest = headers[0], headers[1:]
    for p, h in rest:
        if h.get("schema_version") != h0.get("schema_version"):
            raise UsageError(f"{p}: schema version {h.get('schema_version')} differs from {p0}'s "
                             f"{h0.get('schema_version')}: rerun the older shard with this camcli")
        if h.get("fingerprint") == h0.get("fingerprint"):
            continue
        key = first_difference(h0.get("shaping") or {}, h.get("shaping") or {})
        if key is None:  # same values, different hash: written by another camcli version
            raise UsageError(f"{p}: its fingerprint differs from {p0}'s; were they written by different camcli versions?")
        raise UsageError(
            f"cannot merge {p} with {p0}: {_flag(key)} is {(h.get('shaping') or {}).get(key)!r} there but "
            f"{(h0.get('shaping') or {}).get(key)!r} in {p0}; shards of one run share every option that shapes "
            "the outputs"
        )


def _rebase(rec: dict[str, Any], src_dir: Path, out: Path) -> dict[str, Any]:
    """Output paths relative to the merged folder (records list them relative to their own)."""
    if src_dir.resolve() == out.resolve():
        return rec

    def move(p: str | None) -> str | None:
        return None if p is None else Path(os.path.relpath(src_dir / p, out)).as_posix()

    for e in rec.get("explanations") or []:
        e["overlay"] = move(e.get("overlay"))
        e["raw"] = move(e.get("raw"))
        if e.get("channels"):
            e["channels"]["grid"] = move(e["channels"]["grid"])
    return rec


def merge(out: str | Path, shards: Sequence[str | Path] = ()) -> MergeResult:
    """Merge shard records into ``out``/records.jsonl and ``out``/summary.json.

    Without ``shards``, the records.shard-K-of-N.jsonl files in ``out`` (one --out used by every
    task of a job array); otherwise every records file in the named folders (or the named files).
    """
    out = Path(out)
    files = shard_files(out, [Path(s) for s in shards])
    headers = [(p, read_header(p)) for p in files]
    check_same_run(headers)
    check_writable(out)
    with locked(out, "camcli merge"):
        return _merge(out, headers)


def _merge(out: Path, headers: list[tuple[Path, dict[str, Any]]]) -> MergeResult:
    planned: set[str] = set()
    every_plan = True
    for p, h in headers:
        plan = read_plan(p.parent / ((h.get("inputs") or {}).get("plan") or plan_name(shard_of_name(p.name))))
        every_plan = every_plan and plan is not None
        planned.update(plan or [])
    specs = [(h.get("inputs") or {}).get("shard") for _, h in headers]
    absent: list[str] = []
    ns = {int(s.split("/")[1]) for s in specs if s}
    if len(ns) == 1 and all(specs):
        n = ns.pop()
        have = {int(s.split("/")[0]) for s in specs if s}
        absent = [f"{k}/{n}" for k in range(1, n + 1) if k not in have]

    first = headers[0][1]
    header = {
        **first,
        "run_id": uuid.uuid4().hex,
        "started": min(h.get("started") or "" for _, h in headers),
        "inputs": {"total": max((h.get("inputs") or {}).get("total") or 0 for _, h in headers),
                   "selected": len(planned) if every_plan else None, "plan": plan_name(), "shard": None},
        "merged_from": [os.path.relpath(p, out) for p, _ in headers],
    }
    seen: set[str] = set()
    dupes: dict[str, None] = {}
    bad: list[BadLines] = []
    # The sources may live in ``out`` (its own records.jsonl, a shard's): every one is read in full
    # into a file of its own, which replaces out/records.jsonl only then.
    target = out / records_name()
    stream = RecordStream(out / f".{records_name()}.merging-{uuid.uuid4().hex[:8]}", header)
    stream.open()
    try:
        for p, _ in headers:
            bad.append(BadLines(p))
            for rec in iter_records(p, bad[-1]):
                rel = rec.get("rel") or rec.get("path")
                if rel in seen:
                    dupes[rel] = None
                    continue
                seen.add(rel)
                stream.add(_rebase(rec, p.parent, out))
        stream.close()
        write_plan(out / plan_name(), sorted(planned))
        try:
            os.replace(stream.path, target)
        except OSError as e:
            raise cannot_write(target, e) from None
    finally:
        stream.close()
        stream.path.unlink(missing_ok=True)
    missing = sorted(planned - seen)
    summary = build_summary(header, stream.tally, records=records_name(), interrupted=False, error=None)
    duplicates = sorted(dupes)
    summary["merge"] = {
        "shards": len(headers),
        "missing": {"count": len(missing), "paths": missing[:SHOWN]},
        "duplicates": {"count": len(duplicates), "paths": duplicates[:SHOWN]},
        "absent_shards": absent,
    }
    summary_path = out / summary_name()
    write_summary(summary, summary_path)
    c = summary["counts"]
    failed = c["error"] > 0 or bool(missing) or bool(absent)
    return MergeResult(summary, ExitCode.PARTIAL if failed else ExitCode.OK, summary_path, target,
                       missing, duplicates, absent, [w for b in bad if (w := b.warning()) is not None])


def shown(paths: Sequence[str]) -> str:
    more = f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
    return ", ".join(paths[:SHOWN]) + more

