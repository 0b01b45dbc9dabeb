"""Exceptions that carry the process exit code documented in the README."""

from __future__ import annotations

import difflib
from enum import IntEnum
from typing import Iterable


class ExitCode(IntEnum):
    OK = 0
    CHECK_FAILED = 1
    USAGE = 2
    PARTIAL = 3
    OUTPUT = 4
    INTERRUPTED = 130


class CamcliError(Exception):
    """Base class: a one-line message meant for the user, and an exit code."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, *args: object, layer_hint: bool = False) -> None:
        super().__init__(*args)
        # Another --layer may fix it: whoever knows the model adds where to look (`camcli layers`).
        self.layer_hint = layer_hint


class UsageError(CamcliError):
    """Bad option, unknown name, unreadable config: reported before any work starts (exit 2)."""

    exit_code = ExitCode.USAGE


class ModelError(UsageError):
    """The model or its weights could not be loaded or used."""


class ImageError(CamcliError):
    """One input image could not be decoded; the run goes on without it."""

    exit_code = ExitCode.PARTIAL


class OutputError(CamcliError):
    """Outputs could not be written (disk full, folder gone read-only): the run stops (exit 4)."""

    exit_code = ExitCode.OUTPUT


def suggest(value: str, choices: Iterable[str], n: int = 1) -> str:
    """Return ``"; did you mean 'x'?"`` when a close match exists, else an empty string."""
    close = difflib.get_close_matches(value, list(choices), n=n, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
