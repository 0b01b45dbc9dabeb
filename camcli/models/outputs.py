"""Model outputs: find the scores in a tensor, tuple, dict or ModelOutput.

Classifiers give (batch, classes) logits; segmentation models (batch, classes, H, W) per-pixel
scores (torchvision's segmentation models return them under the key ``out``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from camcli.errors import UsageError


def _describe(output: Any) -> str:  # noqa: ANN401
    if isinstance(output, (tuple, list)):
        return f"positions 0..{len(output) - 1}"
    if isinstance(output, dict) or hasattr(output, "keys"):
        return "keys " + ", ".join(repr(k) for k in list(output.keys()))
    return f"a {type(output).__name__}"


def select(output: Any, key: str | int) -> Any:  # noqa: ANN401
    """``output[key]`` for a tuple/list (a position), a mapping or a ModelOutput (a key)."""
    try:
        if isinstance(output, (tuple, list)):
            return output[int(key)]
        if isinstance(output, dict) or hasattr(output, "keys"):
            return output[key]
        if not isinstance(output, Tensor) and hasattr(output, str(key)):
            return getattr(output, str(key))
    except (KeyError, IndexError, ValueError, TypeError):
        pass
    raise UsageError(f"--output-key {key!r} is not in the model output (it has {_describe(output)})")


def pick_logits(output: Any, key: str | int | None = None) -> Tensor:  # noqa: ANN401
    """Find the (B, classes) logits in a model output: a tensor, tuple/list, dict or ModelOutput."""
    if key is not None:
        if isinstance(output, Tensor):
            raise UsageError(f"--output-key {key!r}: the model returns a single tensor, not a tuple or mapping")
        output = select(output, key)
    if isinstance(output, Tensor):
        if output.dim() not in (2, 4):
            raise UsageError(
                f"the model returns a tensor of shape {tuple(output.shape)}; camcli needs (batch, classes) logits "
                "or (batch, classes, H, W) segmentation scores"
            )
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        keys = list(output.keys())
        for known in ("logits", "out"):
            if known in keys:
                return pick_logits(output[known])
        raise UsageError(f"the model returns a mapping with keys {keys}; choose the logits with --output-key KEY")
    if isinstance(output, (tuple, list)):
        cands = [i for i, o in enumerate(output) if isinstance(o, Tensor) and o.dim() in (2, 4)]
        if len(cands) == 1:
            return output[cands[0]]
        raise UsageError(
            f"the model returns a {type(output).__name__} of {len(output)} items; "
            "choose the logits with --output-key INDEX"
        )
    raise UsageError(f"the model returns {type(output).__name__}; camcli needs (batch, classes) logits")
