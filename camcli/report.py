"""The versioned run header and summary.json: what ran, on what, and counts of what came out."""

from __future__ import annotations

import platform
import uuid
from datetime import datetime, timezone
from typing import Any, Sequence

import torch

from camcli import __version__
from camcli.models import LoadedModel

SCHEMA_VERSION = 2  # 2: per-image records moved from summary.json to records.jsonl


# What the number beside each predicted class means: a classifier's probability (softmax or sigmoid),
# or the share of pixels a segmentation model assigns to the class. A classifier read with --activation
# none reports its raw output as "value" (Session.value_key).
SHARE_KEY = {"classification": "probability", "segmentation": "pixel_share"}


def prediction_entries(
    top: Sequence[tuple[int, float]], model: LoadedModel, key: str | None = None
) -> list[dict[str, Any]]:
    """The record's predictions; ``key``: what the number is called (default: by the model's task)."""
    key = key or SHARE_KEY[model.task]
    return [{"index": i, "label": model.label(i), key: round(p, 6)} for i, p in top]


def run_header(
    *,
    model: LoadedModel,
    layers: Sequence[str],
    device: str,
    options: dict[str, Any],
    input_policy: str,
    shaping: dict[str, Any],
    fingerprint: str,
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """What ran, on what, with which options: the first line of records.jsonl and the head of
    summary.json. ``shaping``: the values behind ``fingerprint``; ``inputs``: how many images were
    found (``total``) and taken by this run (``selected``, one shard's share), and the plan file."""
    return {
        "schema_version": SCHEMA_VERSION,
        "run_id": uuid.uuid4().hex,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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
        "fingerprint": fingerprint,
        "shaping": shaping,
        "inputs": inputs,
    }
