"""Finer-CAM: any class-specific method, explaining a contrast with the most similar classes."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from camcli.errors import UsageError
from camcli.methods.base import MethodInfo, MethodOptions, get_method, register
from camcli.methods.gradient import gradcam


def _contrast(target: Any, logits: Tensor, options: MethodOptions) -> Any:  # noqa: ANN401
    from camcli.targets import contrast

    return contrast(target, logits, options.finer_references, options.finer_alpha)


def _derive(options: MethodOptions) -> MethodInfo:
    """finercam over the base method ``--finer-base``: the base's needs, the contrast as target."""
    base = get_method(options.finer_base)
    if base.name == "finercam" or not base.needs_target:
        raise UsageError(
            f"--finer-base {options.finer_base!r}: finercam needs a class-specific base method "
            "(gradcam, gradcam++, layercam, scorecam, ...), not itself or a class-agnostic one"
        )
    here = get_method("finercam")
    return dataclasses.replace(
        base, name=here.name, aliases=here.aliases, description=f"{here.description} (base: {base.name})",
        paper=here.paper, retarget=_contrast, derive=None,
    )


register(
    "finercam",
    aliases=("finer-cam",),
    needs_gradients=True,
    retarget=_contrast,
    derive=_derive,
    extra_forwards="as its base (--finer-base, gradcam)",
    description="the base method on y^c - alpha * mean score of the R most similar classes (--finer-alpha 0.6, "
    "--finer-references 3): what sets the class apart from its look-alikes",
    paper="Zhang et al. 2025, Finer-CAM (arXiv:2501.11309)",
)(gradcam)
