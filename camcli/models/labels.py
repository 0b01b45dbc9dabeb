"""Class names: ImageNet's built in (shipped as package data), or a file."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from camcli.errors import UsageError


IMAGENET_FILE = "imagenet_labels.txt"  # next to this module; pyproject.toml ships it as package data


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet class names, in class-index order.

    Generated once from torchvision's ``ResNet50_Weights.IMAGENET1K_V2.meta["categories"]`` (a test
    keeps them equal); read from the package so that naming a class does not import torchvision.
    """
    from importlib.resources import files

    text = files("camcli.models").joinpath(IMAGENET_FILE).read_text(encoding="utf-8")
    return tuple(text.splitlines())


def load_labels(path: str | Path) -> list[str]:
    """One label per line (.txt), a JSON list, or a JSON object {index: label}."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--labels {str(p)!r}: no such file (expected a .txt with one label per line, or .json)")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--labels {str(p)!r}: invalid JSON ({e})") from None
        if isinstance(data, list):
            return [str(x) for x in data]
        if isinstance(data, dict):
            try:
                items = sorted((int(k), str(v)) for k, v in data.items())
            except ValueError:
                raise UsageError(f"--labels {str(p)!r}: JSON object keys must be class indices") from None
            if [k for k, _ in items] != list(range(len(items))):
                raise UsageError(f"--labels {str(p)!r}: class indices must run 0..N-1 without gaps")
            return [v for _, v in items]
        raise UsageError(f"--labels {str(p)!r}: expected a JSON list or object")
    return [line.strip() for line in text.splitlines() if line.strip()]
