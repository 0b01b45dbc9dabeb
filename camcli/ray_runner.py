"""`camcli explain --ray`: the explain pipeline on Ray Data.

Images are read and decoded in Ray tasks; maps are computed in a pool of actors (``map_batches``
with a callable class), one per GPU when the cluster has GPUs, else CPU actors; each actor opens
the Session once and writes the overlays of the images it explains into the output folder (which
every node must see: a shared file system). The driver holds the folder's lock, appends the records
the actors return to records.jsonl and writes the summary, exactly as a local run does, so the
result is the same files, the same maps and one summary.

Ray is an optional extra: ``pip install 'camcli[ray]'``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from camcli.allocator import keep_heap_memory
from camcli.errors import OutputError, UsageError
from camcli.feed import Batch, Decoder, Item, cut_batches
from camcli.images import ImageSource
from camcli.options import ExplainOptions
from camcli.run import ImageWriter, Plan, RunResult, error_record, start_run
from camcli.session import Session

INSTALL_HINT = "--ray needs Ray Data, an optional extra: pip install 'camcli[ray]' (or pip install 'ray[data]')"


def require_ray() -> None:
    """UsageError (exit 2) with the install command when Ray Data is not installed."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL_HINT) from None


def decode_row(row: dict[str, Any], decoder: Decoder) -> dict[str, Any]:
    """In a Ray task: the feed's decoding step for one image (--max-pixels checked, resized for the
    model); an unreadable file becomes an error text (its record says why), never a failed task."""
    item = decoder(0, ImageSource(Path(row["file"]), Path(row["rel"])))
    if item.error is not None:
        return {**row, "image": np.zeros((1, 1, 3), np.uint8), "tensor": np.zeros((3, 1, 1), np.uint8),
                "error": item.error.replace(row["file"], row["path"])}
    return {**row, "image": item.image, "tensor": item.tensor.numpy(), "error": ""}  # type: ignore[union-attr]


class CamActor:
    """A Ray actor: opens the Session once, then explains batches and writes their files.

    Returns one JSON record per image; an output error ends the batch with ``{"output_error": ...}``.
    """

    def __init__(self, options: dict[str, Any], out_dir: str, cwd: str) -> None:
        keep_heap_memory()  # the actor owns its worker process, as the command owns its own (camcli.allocator)
        if os.path.isdir(cwd):  # relative --weights/--labels and module:callable models, as on the driver
            os.chdir(cwd)
            sys.path.insert(0, cwd)
        self.session = Session.open(ExplainOptions(**options))
        self.writer = ImageWriter(self.session, Path(out_dir))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"record": np.array([json.dumps(r) for r in self.explain_rows(batch)], dtype=object)}

    def explain_rows(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """The rows Ray Data decoded, cut into batches by the feed's rules (one input shape, the pixel
        budget), explained and written; their records."""
        records: list[dict[str, Any]] = []

        def ident(i: int) -> dict[str, Any]:
            return {"path": str(batch["path"][i]), "rel": str(batch["rel"][i]), "key": str(batch["key"][i])}

        items = (
            Item(i, error=str(batch["error"][i])) if batch["error"][i]
            else Item(i, torch.from_numpy(np.array(batch["tensor"][i])), np.array(batch["image"][i]),
                      tuple(np.asarray(batch["image"][i]).shape[:2]))
            for i in range(len(batch["key"]))
        )
        for got in cut_batches(items, max(1, len(batch["key"]))):
            if not isinstance(got, Batch):
                records.append(error_record(ident(got.index), got.error or ""))
                continue
            outs = self.writer.maps_or_error(got.tensors, got.sizes)
            if isinstance(outs, str):
                records.extend(error_record(ident(item.index), outs) for item in got.items)
                continue
            for item, out in zip(got.items, outs):
                rgb, item.image = item.image, None
                assert rgb is not None and item.tensor is not None
                rec = self.writer.record(ident(item.index), rgb, item.tensor, out)
                try:
                    records.append(self.writer.write(rec, rgb, out, Path(str(batch["stem"][item.index]))))
                except OutputError as e:
                    return [*records, {"output_error": str(e)}]
        return records


def connect(address: str) -> bool:
    """Connect to (or start) Ray; True when this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(address=None if address == "default" else address, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"--ray {address!r}: cannot reach Ray: {str(e).splitlines()[0]}") from None
    return True


def actor_pool(device: str) -> tuple[int, float]:
    """(actors, GPUs per actor): one actor per GPU when the cluster has GPUs (unless --device cpu),
    else one CPU actor per two CPUs (decoding tasks use the others)."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus >= 1 and device != "cpu":
        return gpus, 1.0
    if device.startswith("cuda"):
        raise UsageError(f"--device {device}: the Ray cluster has no GPUs (accepted here: auto, cpu)")
    return max(1, int(res.get("CPU", 1)) // 2), 0.0


def run_on_ray(
    opts: ExplainOptions,
    plan: Plan,
    out_dir: Path,
    *,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunResult:
    """The explain run with Ray Data doing the work; the caller holds the output folder's lock."""
    import ray
    import ray.data

    # The driver checks every option and loads the model once, on its CPU, before any work: the
    # header needs the model, and a bad option must fail here, not in a remote actor.
    driver = Session.open(dataclasses.replace(opts, device="cpu"))
    driver.options = opts  # record the options as given (--device included)
    started_here = connect(opts.ray)
    try:
        actors, gpus = actor_pool(opts.device)
        kind = "GPU" if gpus else "CPU"
        run = start_run(driver, plan, out_dir, device=f"ray: {actors} {kind} actor(s)", on_start=on_start)
        ray.data.DataContext.get_current().enable_progress_bars = False  # camcli shows its own
        logging.getLogger("ray.data").setLevel(logging.ERROR if opts.quiet else logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": on purpose
        sources = plan.sources
        items = [{"path": str(sources[i].path), "file": str(sources[i].path.resolve()), "rel": sources[i].rel.as_posix(),
                  "key": run.keys[i], "stem": run.stems[i].as_posix()} for i in run.todo]
        actor_options = {**dataclasses.asdict(opts), "ray": None}
        decoder = Decoder(driver.preprocess, opts.max_pixels)

        def body() -> None:
            if not items:
                return
            # Half a CPU per decoding task: other resources than the actors' keep Ray Data from fusing
            # decoding into the actors, so images are read and decoded in tasks while actors compute.
            ds = ray.data.from_items(items).map(decode_row, fn_kwargs={"decoder": decoder}, num_cpus=0.5)
            ds = ds.map_batches(
                CamActor, batch_size=opts.batch_size, batch_format="numpy",
                fn_constructor_kwargs={"options": actor_options, "out_dir": str(out_dir.resolve()), "cwd": os.getcwd()},
                compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus, num_cpus=1,
            )
            for row in ds.iter_rows():
                rec = json.loads(row["record"])
                if "output_error" in rec:
                    raise OutputError(rec["output_error"])
                run.stream.add(rec)
                if progress is not None:
                    progress(1)
                if rec["status"] != "ok" and opts.fail_fast:
                    break

        return run.finish(body)
    finally:
        if started_here:
            ray.shutdown()
