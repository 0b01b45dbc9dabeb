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
from camcli.methods import gradient, classic, perturbation, eigen, guided, attention  # noqa: F401, I001  (registers, in this order)

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
