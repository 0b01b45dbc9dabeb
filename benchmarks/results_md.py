"""Marked blocks of benchmarks/RESULTS.md: each script rewrites only the blocks it owns.

Several scripts write RESULTS.md (bench.py, ray_vs_local.py), and a rerun of some sections must
keep the others. A block is the text between ``<!-- KEY: begin -->`` and ``<!-- KEY: end -->``
lines; :func:`update` replaces the blocks it is given and keeps everything else byte for byte:
other scripts' blocks, other sections, text written by hand outside any block.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence


def begin(key: str) -> str:
    return f"<!-- {key}: begin -->"


def end(key: str) -> str:
    return f"<!-- {key}: end -->"


def block(key: str, lines: Sequence[str]) -> str:
    """The block's text: its markers around ``lines``, ending in a newline."""
    body = "\n".join(lines).strip("\n")
    return f"{begin(key)}\n{body}\n{end(key)}\n"


def keys(text: str) -> list[str]:
    """The keys of the blocks in ``text``, in order."""
    return re.findall(r"^<!-- (\S+): begin -->$", text, flags=re.M)


def _span(text: str, key: str) -> tuple[int, int] | None:
    """Where the block ``key`` lies in ``text`` (from its begin marker to after its end line)."""
    m = re.search(rf"^{re.escape(begin(key))}\n.*?^{re.escape(end(key))}\n?", text, flags=re.S | re.M)
    return None if m is None else (m.start(), m.end())


def update(text: str, blocks: Mapping[str, Sequence[str]], order: Sequence[str]) -> str:
    """``text`` with each of ``blocks`` (key -> lines) written in place of its old block.

    A block not yet in ``text`` goes after the nearest block before it in ``order`` that is there,
    else before the nearest one after it, else at the end. Nothing outside these blocks changes.
    """
    for key in sorted(blocks, key=lambda k: order.index(k) if k in order else len(order)):
        new = block(key, blocks[key])
        span = _span(text, key)
        if span is not None:
            text = text[: span[0]] + new + text[span[1] :]
            continue
        rank = order.index(key) if key in order else len(order)
        before = [s for k in reversed(order[:rank]) if (s := _span(text, k)) is not None]
        after = [s for k in order[rank + 1 :] if (s := _span(text, k)) is not None]
        if before:
            at = before[0][1]
            text = text[:at] + "\n" + new + text[at:]
        elif after:
            at = after[0][0]
            text = text[:at] + new + "\n" + text[at:]
        else:
            text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + new
    return text
