"""Boxes [x0, y0, x1, y1] in a stated unit: the image's pixels, or fractions of its width and height.

The unit is never guessed from the number type. A box with a value above 1 is in pixels (no
fraction is). One whose values all lie in [0, 1] says its unit: ``{fraction: [...]}`` or
``{pixels: [...]}`` in a file, ``fraction:...`` or ``pixels:...`` on the command line. Only where
a plain list of fractions was documented (a check file's ``region``, ``--region``) does a plain
list in [0, 1] with a value that is no whole number still mean fractions (as pixels it would be a
box smaller than one pixel); ``[0, 0, 1, 1]`` is refused there too, naming both spellings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Unit = Literal["pixels", "fraction"]
UNITS: tuple[Unit, ...] = ("pixels", "fraction")


class BoxError(ValueError):
    """A value that is no box, or whose unit is ambiguous; the message says what is accepted."""


@dataclass(frozen=True)
class Box:
    values: tuple[float, float, float, float]
    unit: Unit

    def pixels(self, w: int, h: int) -> tuple[float, float, float, float]:
        """x0, y0, x1, y1 in the pixels of a w x h image."""
        x0, y0, x1, y1 = self.values
        return (x0 * w, y0 * h, x1 * w, y1 * h) if self.unit == "fraction" else (x0, y0, x1, y1)

    def fractions(self, w: int, h: int) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = self.values
        return (x0 / w, y0 / h, x1 / w, y1 / h) if self.unit == "pixels" else (x0, y0, x1, y1)


def _numbers(value: Any) -> tuple[float, float, float, float] | None:  # noqa: ANN401
    if isinstance(value, (list, tuple)) and len(value) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    return None


def _spellings(vals: tuple[float, ...], *, cli: bool) -> str:
    nums = ", ".join(f"{v:g}" for v in vals)
    if cli:
        plain = nums.replace(", ", ",")
        return f"fraction:{plain} (a share of the image's width and height) or pixels:{plain}"
    return f"{{fraction: [{nums}]}} (a share of the image's width and height) or {{pixels: [{nums}]}}"


def parse_box(value: Any, *, plain_fractions: bool, cli: bool = False) -> Box:  # noqa: ANN401
    """A box from a file's value (a list, or a one-key mapping ``pixels``/``fraction``), or from
    ``--region`` text when ``cli``. BoxError when it is no box or its unit is ambiguous."""
    if cli:
        text = str(value).strip()
        unit_text, sep, rest = text.partition(":")
        if sep and unit_text.strip() in UNITS:
            value = {unit_text.strip(): rest}
        else:
            value = text
        if isinstance(value, dict):
            (u, t), = value.items()
            value = {u: _split(t)}
        else:
            value = _split(value)
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in UNITS:
            raise BoxError(f"{value!r} is not a box: use {{pixels: [x0, y0, x1, y1]}} or {{fraction: [x0, y0, x1, y1]}}")
        (unit, inner), = value.items()
        vals = _numbers(inner)
        if vals is None:
            raise BoxError(f"{inner!r} is not a box [x0, y0, x1, y1] of four numbers")
        if unit == "fraction" and not all(0.0 <= v <= 1.0 for v in vals):
            raise BoxError(f"fraction {list(inner)} has a value outside [0, 1]")
        return Box(vals, unit)
    vals = _numbers(value)
    if vals is None:
        raise BoxError(f"{value!r} is not a box [x0, y0, x1, y1] of four numbers")
    if any(v > 1.0 for v in vals):
        return Box(vals, "pixels")
    if plain_fractions and not all(v.is_integer() for v in vals):
        return Box(vals, "fraction")
    raise BoxError(f"{value!r} is ambiguous: every value lies in [0, 1]; write {_spellings(vals, cli=cli)}")


def _split(text: Any) -> Any:  # noqa: ANN401
    parts = str(text).split(",")
    try:
        return [float(p) for p in parts]
    except ValueError:
        return str(text)
