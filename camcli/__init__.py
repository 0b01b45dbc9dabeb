"""camcli: class activation maps for image classifiers, from the command line or Python."""

__version__ = "0.1.0"

from camcli.pipeline import ExplainOptions, RunResult, explain  # noqa: E402

__all__ = ["ExplainOptions", "RunResult", "explain", "__version__"]
