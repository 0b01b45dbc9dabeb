"""Strict JSON for every file and document camcli writes: no bare NaN or Infinity.

Python's json writes float('nan') as ``NaN``, which JSON.parse and strict parsers reject. Here a
non-finite number becomes null, and a dict document says where in ``non_finite`` (dotted paths),
so a reader can tell a missing value from one the model made non-finite.
"""

from __future__ import annotations

import json
import math
from typing import Any

NOTE_KEY = "non_finite"
SHOWN = 20  # paths listed in the note


def finite(value: Any, path: str = "", found: list[str] | None = None) -> Any:  # noqa: ANN401
    """``value`` with every non-finite float (numpy's included) replaced by None; their paths go to ``found``."""
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value, "shape", None) == ()):
        try:
            f = float(value)
        except (TypeError, ValueError):
            return value
        if math.isfinite(f):
            return value
        if found is not None:
            found.append(path or ".")
        return None
    if isinstance(value, dict):
        return {k: finite(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v, f"{path}.{i}" if path else str(i), found) for i, v in enumerate(value)]
    return value


def strict(doc: Any) -> Any:  # noqa: ANN401
    """``doc`` made finite; a dict with non-finite values gets ``non_finite``: the paths set to null."""
    found: list[str] = []
    clean = finite(doc, found=found)
    if found and isinstance(clean, dict):
        clean[NOTE_KEY] = sorted(set(found) | set(clean.get(NOTE_KEY) or []))[:SHOWN]
    return clean


def dumps(doc: Any, **kwargs: Any) -> str:  # noqa: ANN401
    """json.dumps of ``strict(doc)``, refusing anything non-finite left (allow_nan=False)."""
    return json.dumps(strict(doc), allow_nan=False, **kwargs)
