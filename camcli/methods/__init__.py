"""Registered CAM methods. Importing this package registers every built-in method."""

from camcli.methods.base import (
    CamInputs,
    MethodInfo,
    MethodOptions,
    available_methods,
    get_method,
    parse_methods,
    register,
)
from camcli.methods import gradient  # noqa: F401  (registers)

__all__ = [
    "CamInputs",
    "MethodInfo",
    "MethodOptions",
    "available_methods",
    "get_method",
    "parse_methods",
    "register",
]
