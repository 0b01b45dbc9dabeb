"""`explain` as a plain function: inputs -> overlays, raw maps, records.jsonl and summary.json.

:func:`run_explain` checks what can be checked before any work, finds the inputs (camcli/feed.py),
holds the output folder, and chooses the runner: the local one (camcli/local_runner.py) or Ray
(camcli/ray_runner.py). Both build on the run layer (camcli/run.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from camcli.errors import UsageError
from camcli.feed import find_inputs
from camcli.local_runner import run_local
from camcli.models import LoadedModel
from camcli.options import ExplainOptions
from camcli.outdir import check_writable, locked
from camcli.ray_runner import require_ray, run_on_ray
from camcli.render import resolve_colormap
from camcli.run import Plan, RunResult, output_stems
from camcli.session import Session, stderr_warning

__all__ = ["ExplainOptions", "RunResult", "run_explain"]


def run_explain(
    inputs: Sequence[str | Path],
    options: ExplainOptions | None = None,
    *,
    model: LoadedModel | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunResult:
    """Explain every image under ``inputs``; writes overlays, records.jsonl and summary.json under ``options.out``.

    Everything that can be checked before work starts is checked first (UsageError, exit 2).
    Per-image failures are recorded and give exit code 3; a write that fails stops the run (exit 4).
    """
    opts = options or ExplainOptions()
    opts.validate()
    resolve_colormap(opts.colormap or ("diverging" if opts.signed else "jet"))  # a bad name: exit 2 before work
    out_dir = Path(opts.out)
    found = find_inputs(inputs, opts.recursive, out_dir, opts.shard)
    check_writable(out_dir)
    if opts.ray is not None:
        require_ray()
        if model is not None:
            raise UsageError("--ray: each Ray actor loads the model from --model; call run_explain() without model=")
    lock = locked(out_dir, "camcli explain", found.shard, warn=None if opts.quiet else stderr_warning)
    try:
        # output names are decided over every input found, so each shard and rerun names an image alike
        plan = Plan(found.sources, found.total, found.shard, found.skipped,
                    stems=output_stems(found.sources, found.found))
        if opts.ray is not None:
            return run_on_ray(opts, plan, out_dir, progress=progress, on_start=on_start)
        return run_local(Session.open(opts, model=model), plan, out_dir, progress=progress, on_start=on_start)
    finally:
        lock.release()
