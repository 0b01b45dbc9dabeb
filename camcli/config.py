"""YAML config files with the same keys as the command-line options; flags win."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from camcli.errors import UsageError, suggest
from camcli.pipeline import ExplainOptions

_RENAMES = {"class": "classes"}
_FIELDS = {f.name: f for f in dataclasses.fields(ExplainOptions) if f.name != "extra"}


def _key(raw: str) -> str:
    k = raw.strip().replace("-", "_")
    return _RENAMES.get(k, k)


def read_yaml(path: Path, what: str, error: type[UsageError] = UsageError) -> Any:  # noqa: ANN401
    """Load a YAML file; a missing file or a syntax error raises ``error`` naming ``what``."""
    if not path.is_file():
        raise error(f"{what}: no such file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise error(f"{what}: not valid YAML: {str(e).splitlines()[0]}") from None


def read_config(path: str | Path) -> dict[str, Any]:
    """Parse and check a config file: unknown keys and wrong types are usage errors (exit 2)."""
    p = Path(path)
    data = read_yaml(p, f"--config {str(p)!r}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {str(p)!r}: expected a mapping of option: value, got {type(data).__name__}")
    out: dict[str, Any] = {}
    accepted = sorted(k.replace("_", "-") for k in _FIELDS if k != "classes") + ["class"]
    for raw, value in data.items():
        k = _key(str(raw))
        if k not in _FIELDS:
            raise UsageError(
                f"--config {str(p)!r}: unknown key {raw!r}{suggest(str(raw), accepted) or ''} "
                f"(accepted: {', '.join(accepted)})"
            )
        out[k] = _check_type(p, str(raw), k, value)
    return out


def _check_type(path: Path, raw: str, key: str, value: Any) -> Any:
    default = _FIELDS[key].default
    if value is None:
        return None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UsageError(f"--config {str(path)!r}: {raw} must be true or false, got {value!r}")
    elif isinstance(default, int) or key in ("image_size", "score_channels", "workers"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"--config {str(path)!r}: {raw} must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"--config {str(path)!r}: {raw} must be a number, got {value!r}")
        value = float(value)
    elif key in ("method", "layer", "classes"):
        if isinstance(value, list):
            value = [str(v) for v in value]
        else:
            value = str(value)
    elif not isinstance(value, str):
        raise UsageError(f"--config {str(path)!r}: {raw} must be a string, got {value!r}")
    return value


def merge(config: dict[str, Any], flags: dict[str, Any]) -> ExplainOptions:
    """Defaults < config file < flags given on the command line (None means: not given)."""
    values: dict[str, Any] = dict(config)
    for k, v in flags.items():
        if v is not None:
            values[k] = v
    return ExplainOptions(**values)
