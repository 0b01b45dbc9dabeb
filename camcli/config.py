"""YAML files: read safely, with errors that name the file. Option keys live in camcli.options."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from camcli.errors import UsageError


def read_yaml(path: Path, what: str, error: type[UsageError] = UsageError) -> Any:  # noqa: ANN401
    """Load a YAML file; a missing, binary or non-UTF-8 file or a syntax error raises ``error`` naming ``what``."""
    if not path.is_file():
        raise error(f"{what}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{what}: not a text file (expected UTF-8 YAML)") from None
    except OSError as e:
        raise error(f"{what}: cannot be read ({e.strerror or e})") from None
    if "\x00" in text:
        raise error(f"{what}: not a text file (expected UTF-8 YAML)")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{what}: not valid YAML: {str(e).splitlines()[0]}") from None
