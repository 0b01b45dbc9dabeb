"""evaluate's outputs as they stream: per-image records to a JSON-lines file, aggregates from a tally.

``evaluation-records.jsonl`` holds one line per image (in input order), appended and flushed as its
metrics are done; ``evaluation.json`` holds the aggregates, which `MetricTally` keeps in constant
memory (explain's rule: nothing is kept per image once its record is written). `CurveMeans` keeps
the running sum of the deletion and insertion curves that ``--plots`` draws.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np

from camcli import jsonout
from camcli.writer import cannot_write

RECORDS_NAME = "evaluation-records.jsonl"
SCALE = 10**6  # values are rounded to 6 decimals: sums are kept in exact integer millionths


class MetricTally:
    """Mean, population std and count per (map name, metric) over images, one record at a time.

    Sums are integers (values in millionths, as rounded in the records), so the aggregate does not
    depend on the order images are added in, and the mean and std are computed exactly before their
    one rounding to 6 decimals. Undefined values (None, NaN) are not counted.
    """

    def __init__(self) -> None:
        self._sums: dict[tuple[str, str], list[int]] = {}  # -> [n, Σ k, Σ k²], k = round(value * 1e6)

    def add(self, record: dict[str, Any]) -> None:
        if record.get("status") != "ok":
            return
        for name, values in record["metrics"].items():
            for metric, v in values.items():
                if v is None or not math.isfinite(v):
                    continue
                k = round(v * SCALE)
                acc = self._sums.setdefault((name, metric), [0, 0, 0])
                acc[0] += 1
                acc[1] += k
                acc[2] += k * k

    def stats(self, name: str, metric: str) -> dict[str, Any]:
        n, s1, s2 = self._sums.get((name, metric), (0, 0, 0))
        if n == 0:
            return {"mean": None, "std": None, "n": 0}
        mean = Fraction(s1, n * SCALE)
        var = Fraction(n * s2 - s1 * s1, n * n * SCALE * SCALE)
        return {"mean": round(float(mean), 6), "std": round(math.sqrt(float(var)), 6), "n": n}


class CurveMeans:
    """The mean deletion and insertion curve per map name, as a running sum (constant memory)."""

    def __init__(self) -> None:
        self._sums: dict[tuple[str, str], tuple[np.ndarray, list[int]]] = {}

    def add(self, name: str, kind: str, curve: np.ndarray) -> None:
        total, n = self._sums.setdefault((name, kind), (np.zeros(len(curve), dtype=np.float64), [0]))
        total += np.asarray(curve, dtype=np.float64)
        n[0] += 1

    def means(self) -> dict[str, dict[str, list[float]]]:
        """{name: {kind: mean curve}} for the curves that were measured."""
        out: dict[str, dict[str, list[float]]] = {}
        for (name, kind), (total, n) in self._sums.items():
            out.setdefault(name, {})[kind] = (total / n[0]).tolist()
        return out


class RecordWriter:
    """Appends one JSON line per image to ``path`` (replacing an earlier run's file) and counts it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tally = MetricTally()
        self.images = self.ok = 0
        try:
            self._file: TextIO | None = open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise cannot_write(self.path, e) from None

    def add(self, record: dict[str, Any]) -> None:
        self.tally.add(record)
        self.images += 1
        self.ok += record.get("status") == "ok"
        assert self._file is not None
        try:
            self._file.write(jsonout.dumps(record) + "\n")  # a NaN is null, named in "non_finite"
        except OSError as e:
            raise cannot_write(self.path, e) from None

    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as e:
                raise cannot_write(self.path, e) from None

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # a line that did not reach the disk: readers stop before it
            self._file = None

    def counts(self) -> dict[str, int]:
        return {"images": self.images, "ok": self.ok, "error": self.images - self.ok}


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """The image records of an evaluation records file, in input order."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return  # a line cut by an interruption: everything before it stands
