"""camcli: class activation maps for image classifiers, from the command line or Python.

    from camcli import explain, ExplainOptions
    result = explain(["photos/"], ExplainOptions(method="gradcam,layercam", out="heatmaps"))

Heavy modules (torch) load on first use, so `camcli --version` and `--help` answer at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"  # the one source: pyproject.toml reads it (tool.setuptools.dynamic)

if TYPE_CHECKING:  # pragma: no cover
    from camcli.check import run_check
    from camcli.engine import CamEngine
    from camcli.models import load_model
    from camcli.options import EvaluateOptions, ExplainOptions
    from camcli.pipeline import run_explain
    from camcli.pipeline import run_explain as explain
    from camcli.run import RunResult
    from camcli.session import Session

_LAZY = {
    "ExplainOptions": "camcli.options",
    "EvaluateOptions": "camcli.options",
    "Session": "camcli.session",
    "RunResult": "camcli.run",
    "run_explain": "camcli.pipeline",
    "CamEngine": "camcli.engine",
    "load_model": "camcli.models",
    "run_check": "camcli.check",
}


def __getattr__(name: str) -> Any:  # noqa: ANN401
    if name == "explain":  # the name this API has always had: run_explain, the `explain` command's function
        name = "run_explain"
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'camcli' has no attribute {name!r}")


__all__ = ["CamEngine", "EvaluateOptions", "ExplainOptions", "Session", "RunResult", "explain", "run_explain", "load_model", "run_check", "__version__"]
