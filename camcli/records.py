"""The records stream: one JSON line per finished image, under ``--out``.

``records.jsonl`` (``records.shard-K-of-N.jsonl`` for a shard) starts with the run's header (schema
version, versions, model, options, the fingerprint of what shapes the outputs and those options
themselves, the inputs planned) and then holds one record per image, appended and flushed the
moment the image's files are all on disk. It is the run's journal (``--skip-existing`` reads it),
the source of summary.json's counts and aggregates, and what ``camcli summary`` and ``camcli merge``
read. Nothing here keeps a record in memory longer than it takes to write or count it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, TextIO

from camcli import jsonout
from camcli.errors import UsageError
from camcli.outdir import locked, shard_suffix
from camcli.writer import cannot_write, write_atomic


def records_name(shard: tuple[int, int] | None = None) -> str:
    return f"records{shard_suffix(shard)}.jsonl"


def summary_name(shard: tuple[int, int] | None = None) -> str:
    return f"summary{shard_suffix(shard)}.json"


def plan_name(shard: tuple[int, int] | None = None) -> str:
    """The inputs a run planned, one relative path a line: what `camcli merge` finds missing."""
    return f".camcli-plan{shard_suffix(shard)}.txt"


def output_files(record: dict[str, Any]) -> list[str]:
    """Every file a record lists, relative to its output folder."""
    files = []
    for e in record.get("explanations") or []:
        files.extend(e[k] for k in ("overlay", "raw") if e.get(k))
        if e.get("channels"):
            files.append(e["channels"]["grid"])
    return files


class Tally:
    """Counts and aggregates over records, one record at a time (constant memory)."""

    TOP_CLASSES = 10

    def __init__(self) -> None:
        self.images = self.ok = self.reused = 0
        # (method, layer) -> [maps, empty, Σ top10, Σ mean]; sums in millionths, so that they do not
        # depend on the order images finished in (float sums do, in the last digit)
        self._maps: dict[tuple[str, str], list[int]] = {}
        self._top1: Counter[tuple[int, str | None]] = Counter()

    def add(self, rec: dict[str, Any]) -> None:
        self.images += 1
        self.reused += bool(rec.get("reused"))
        if rec.get("status") != "ok":
            return
        self.ok += 1
        if rec.get("predictions"):
            p = rec["predictions"][0]
            self._top1[(p["index"], p.get("label"))] += 1
        for e in rec.get("explanations") or []:
            acc = self._maps.setdefault((e["method"], e["layer"]), [0, 0, 0, 0])
            st = e.get("stats") or {}
            acc[0] += 1
            acc[1] += bool(st.get("empty"))
            acc[2] += round(float(st.get("top10_energy_share") or 0.0) * 1e6)
            acc[3] += round(float(st.get("mean") or 0.0) * 1e6)

    def counts(self, planned: int | None = None) -> dict[str, int]:
        c = {"images": self.images, "ok": self.ok, "error": self.images - self.ok, "reused": self.reused}
        if planned is not None and planned > self.images:
            c["not_processed"] = planned - self.images
        return c

    def aggregate(self) -> dict[str, Any]:
        """Per method and layer: maps, empty maps, mean top-10% energy share and mean map value;
        the most frequent top-1 classes."""
        methods: dict[str, dict[str, Any]] = {}
        for (method, layer), (n, empty, top10, mean) in sorted(self._maps.items()):
            methods.setdefault(method, {})[layer] = {
                "maps": int(n), "empty": int(empty),
                "mean_top10_energy_share": round(top10 / n / 1e6, 6), "mean_value": round(mean / n / 1e6, 6),
            }
        # ties by class index, so the order does not depend on the order records finished in
        ranked = sorted(self._top1.items(), key=lambda kv: (-kv[1], kv[0][0]))[: self.TOP_CLASSES]
        top1 = [{"index": i, "label": label, "images": n} for (i, label), n in ranked]
        return {"methods": methods, "top1_classes": top1}


SHOWN_LINES = 10  # bad line numbers named in a warning


class BadLines:
    """The lines of a records file that were skipped: not JSON, not UTF-8, or not a record.

    Readers skip them and go on; ``warning()`` names them (their line numbers) for the user.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lines: list[int] = []

    def __len__(self) -> int:
        return len(self.lines)

    def warning(self) -> str | None:
        return bad_lines_warning(self.path, len(self.lines), self.lines) if self.lines else None


def bad_lines_warning(path: Path, count: int, lines: list[int]) -> str:
    """The warning for ``count`` skipped lines of a records file, the first of them numbered."""
    more = f" and {count - min(count, SHOWN_LINES)} more" if count > SHOWN_LINES else ""
    shown = ", ".join(map(str, lines[:SHOWN_LINES])) + more
    return (f"{path}: skipped {count} unreadable line(s) that are no camcli record (line {shown}); "
            "their images count as not processed")


def _is_record(rec: Any) -> bool:  # noqa: ANN401
    """Whether a parsed line has the shape every reader relies on (status, paths, explanations)."""
    if not isinstance(rec, dict) or rec.get("status") not in ("ok", "error"):
        return False
    if not isinstance(rec.get("rel", rec.get("path")), str) or not isinstance(rec.get("key", ""), str):
        return False
    if rec["status"] == "error":
        return isinstance(rec.get("error"), str)
    preds = rec.get("predictions") or []
    if not isinstance(preds, list) or not all(isinstance(p, dict) and isinstance(p.get("index"), int) for p in preds):
        return False
    exps = rec.get("explanations") or []
    return isinstance(exps, list) and all(
        isinstance(e, dict) and isinstance(e.get("method"), str) and isinstance(e.get("layer"), str)
        and isinstance(e.get("stats") or {}, dict) and isinstance(e.get("channels") or {}, dict)
        and all(isinstance((e.get("stats") or {}).get(k), (int, float, type(None))) for k in ("mean", "top10_energy_share"))
        and (not e.get("channels") or isinstance(e["channels"].get("grid"), str))
        and all(isinstance(e.get(k), (str, type(None))) for k in ("overlay", "raw"))
        for e in exps
    )


def _parse(raw: bytes) -> Any:  # noqa: ANN401
    """A line's JSON value; ValueError when it is not UTF-8 or not JSON (non-finite numbers included)."""
    def refuse(name: str) -> Any:  # noqa: ANN401
        raise ValueError(f"non-finite number {name}")

    return json.loads(raw.decode("utf-8"), parse_constant=refuse)


def _lines(f: IO[bytes], bad: BadLines | None, *, first: int = 1) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of each line. A line that is not UTF-8 JSON is counted in ``bad``
    and skipped, except the last line when it lacks its newline: a write cut by a crash or a kill,
    which is no damage (everything before it stands)."""
    for n, raw in enumerate(f, first):
        if not raw.strip():
            continue
        try:
            yield n, _parse(raw)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError included
            if raw.endswith(b"\n") and bad is not None:  # without it, the file's cut last line
                bad.lines.append(n)


def read_header(path: Path) -> dict[str, Any]:
    """The header of a records file; UsageError when it is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.readline()
    except OSError as e:
        raise UsageError(f"cannot read records file {str(path)!r}: {e.strerror or e}") from None
    try:
        first = _parse(raw)
    except ValueError:
        first = None
    if not isinstance(first, dict) or "fingerprint" not in first or "schema_version" not in first:
        raise UsageError(f"{str(path)!r} is not a camcli records file (its first line is no run header)")
    return first


def iter_records(path: Path, bad: BadLines | None = None) -> Iterator[dict[str, Any]]:
    """The image records of a records file, in the order they finished. Lines that are no record
    (garbled, not UTF-8, a JSON value of another shape) are skipped, never the end of reading;
    their line numbers go into ``bad``."""
    with open(path, "rb") as f:
        f.readline()  # the header
        for n, rec in _lines(f, bad, first=2):
            if _is_record(rec):
                yield rec
            elif bad is not None:
                bad.lines.append(n)


class RecordStream:
    """Appends records to ``path`` as images finish; counts them in a Tally. Thread-safe."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = header
        self.tally = Tally()
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        self.bad = BadLines(self.path)  # unreadable lines of the earlier run's file (--skip-existing)

    def open(self, reuse: Callable[[dict[str, Any]], bool] | None = None,
             before_swap: Callable[[], None] | None = None) -> set[str]:
        """Start the file: the header, then the records of an earlier run with the same fingerprint
        that ``reuse`` accepts (their keys are returned). The new file replaces the old one in one
        rename, after ``before_swap``; until then the old one stands. OutputError when it cannot be written.
        """
        part = self.path.with_name(f".{self.path.name}.part")
        kept: set[str] = set()
        try:
            self._file = open(part, "w", encoding="utf-8")
            self._file.write(jsonout.dumps(self.header) + "\n")
            if reuse is not None and self.path.is_file():
                if _header_or_none(self.path).get("fingerprint") == self.header["fingerprint"]:
                    for rec in iter_records(self.path, self.bad):
                        if rec.get("key") not in kept and reuse(rec):
                            rec["reused"] = True  # done by an earlier run
                            self._file.write(jsonout.dumps(rec) + "\n")
                            self.tally.add(rec)
                            kept.add(rec["key"])
            self._file.flush()
            if before_swap is not None:
                before_swap()
            os.replace(part, self.path)
        except BaseException as e:
            self.close()
            part.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise cannot_write(self.path, e) from None
            raise
        return kept

    def add(self, rec: dict[str, Any]) -> None:
        rec = jsonout.strict(rec)  # a NaN from the model: null, and named in rec["non_finite"]
        line = jsonout.dumps(rec) + "\n"
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as e:
                raise cannot_write(self.path, e) from None
            self.tally.add(rec)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:
                    pass  # a line that did not reach the disk: readers stop before it
                self._file = None


def _header_or_none(path: Path) -> dict[str, Any]:
    try:
        return read_header(path)
    except UsageError:
        return {}


def write_plan(path: Path, rels: Iterable[str]) -> None:
    write_atomic(path, "".join(f"{r}\n" for r in rels).encode("utf-8"))


def read_plan(path: Path) -> list[str] | None:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None


def sorted_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in a stable order (by relative path), whatever order they finished in."""
    return sorted(records, key=lambda r: (r.get("rel") or "", r.get("path") or ""))


def with_records(summary: dict[str, Any], records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The summary with every image record included under ``images``: what ``--json`` prints."""
    return {**summary, "images": sorted_records(records)}


def load_run(out_dir: str | Path, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """A run folder's summary.json with its records included under ``images`` (what ``--json`` prints)."""
    out = Path(out_dir)
    summary = json.loads((out / summary_name(shard)).read_text(encoding="utf-8"))
    return with_records(summary, iter_records(out / summary["records"]))


def find_records(target: Path) -> Path:
    """The records file of a folder (or the file itself); UsageError naming what is there instead."""
    if target.is_file():
        return target
    if not target.is_dir():
        raise UsageError(f"no such folder or records file: {str(target)!r}")
    whole = target / records_name()
    if whole.is_file():
        return whole
    shards = sorted(p.name for p in target.glob("records.shard-*-of-*.jsonl"))
    if shards:
        raise UsageError(
            f"{str(target)!r} holds shard records ({', '.join(shards)}) but no records.jsonl: merge them with "
            f"`camcli merge {target}`, or name one shard's file"
        )
    raise UsageError(f"{str(target)!r} holds no records.jsonl (is it the --out folder of a camcli explain run?)")


def build_summary(
    header: dict[str, Any], tally: Tally, *, records: str, interrupted: bool, error: str | None
) -> dict[str, Any]:
    """summary.json: the run's header, counts and aggregates; the per-image records stay in ``records``."""
    inputs = header.get("inputs") or {}
    counts = tally.counts(inputs.get("selected"))
    if inputs.get("skipped_entries"):
        counts["skipped_entries"] = inputs["skipped_entries"]  # FIFOs, sockets, broken links in folders
    return {
        **header,
        "records": records,
        "counts": counts,
        "aggregate": tally.aggregate(),
        "interrupted": interrupted,
        "error": error,
    }


def write_summary(summary: dict[str, Any], path: str | Path) -> None:
    write_atomic(path, (jsonout.dumps(summary, indent=2) + "\n").encode("utf-8"))


def summary_path_for(records_path: Path) -> Path:
    """records.jsonl -> summary.json; records.shard-K-of-N.jsonl -> summary.shard-K-of-N.json."""
    return records_path.with_name("summary" + records_path.name[len("records"):-len(".jsonl")] + ".json")


def shard_of_name(name: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"records\.shard-(\d+)-of-(\d+)\.jsonl", name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def rebuild(target: Path, *, write: bool = False) -> tuple[dict[str, Any], Path]:
    """`camcli summary`: the summary of a folder's records (or a records file), and that file.

    ``write``: also store it as the folder's summary.json; the run must be over (the folder's lock
    is taken, so a running run makes this exit 2 naming it).
    """
    path = find_records(Path(target))
    if not write:
        return summarize(path), path
    with locked(path.parent, "camcli summary", shard_of_name(path.name)):
        summary = summarize(path)
        write_summary(summary, summary_path_for(path))
    return summary, path


def summarize(records_path: Path, header: dict[str, Any] | None = None) -> dict[str, Any]:
    """A summary rebuilt from a records file: its header, counts and aggregates."""
    header = header or read_header(records_path)
    tally = Tally()
    bad = BadLines(records_path)
    for rec in iter_records(records_path, bad):
        tally.add(rec)
    planned = (header.get("inputs") or {}).get("selected")
    summary = build_summary(header, tally, records=records_path.name, interrupted=False, error=None)
    summary["interrupted"] = planned is not None and tally.images < planned
    summary["rebuilt_from"] = records_path.name
    if bad:
        summary["unreadable_lines"] = {"count": len(bad), "lines": bad.lines[:SHOWN_LINES]}
    return summary
