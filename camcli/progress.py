"""A tqdm progress bar on stderr that hides itself when stderr is not a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, disable: bool = False, unit: str = "img") -> None:
        self.disable = disable or not sys.stderr.isatty()
        self.unit = unit
        self._bar: tqdm | None = None

    def start(self, total: int) -> None:
        if not self.disable:
            self._bar = tqdm(total=total, unit=self.unit, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
