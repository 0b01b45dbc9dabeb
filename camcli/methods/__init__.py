"""Registered CAM methods. Importing this package registers every built-in method."""

from camcli.methods.base import (
    CamInputs,
    MethodInfo,
    MethodOptions,
    MethodOutput,
    available_methods,
    get_method,
    parse_methods,
    register,
)
# registers, in this order
from camcli.methods import gradient, classic, perturbation, eigen, guided, fullgrad, contrast, attention, blackbox  # noqa: F401, I001

__all__ = [
    "CamInputs",
    "MethodInfo",
    "MethodOptions",
    "MethodOutput",
    "available_methods",
    "get_method",
    "parse_methods",
    "register",
]
