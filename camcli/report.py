"""The versioned summary.json: what ran, on what, and what came out per image."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Sequence

import torch

from camcli import __version__
from camcli.models import LoadedModel
from camcli.writer import write_atomic

SCHEMA_VERSION = 1


# What the number beside each predicted class means: a classifier's softmax probability, or the
# share of pixels a segmentation model assigns to the class.
SHARE_KEY = {"classification": "probability", "segmentation": "pixel_share"}


def prediction_entries(top: Sequence[tuple[int, float]], model: LoadedModel) -> list[dict[str, Any]]:
    key = SHARE_KEY[model.task]
    return [{"index": i, "label": model.label(i), key: round(p, 6)} for i, p in top]


def build_summary(
    *,
    model: LoadedModel,
    layers: Sequence[str],
    device: str,
    options: dict[str, Any],
    input_policy: str,
    images: list[dict[str, Any]],
) -> dict[str, Any]:
    ok = sum(1 for im in images if im["status"] == "ok")
    return {
        "schema_version": SCHEMA_VERSION,
        "camcli_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
        "model": {
            "name": model.name,
            "source": model.source,
            "weights": model.weights,
            "weights_sha256": model.weights_sha256,
            "num_classes": model.num_classes,
            "task": model.task,
            "layer": ",".join(layers),
            "layers": list(layers),
            "input_policy": input_policy,
            "input_size": model.input_size,
            "mean": list(model.mean),
            "std": list(model.std),
        },
        "options": options,
        "counts": {"images": len(images), "ok": ok, "error": len(images) - ok},
        "images": images,
    }


def write_summary(summary: dict[str, Any], path: str | Path) -> None:
    write_atomic(path, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
