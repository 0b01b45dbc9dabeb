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
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from camcli.allocator import keep_heap_memory
from camcli.errors import OutputError, UsageError
from camcli.images import ImageDataset, ImageSource, Preprocess
from camcli.options import ExplainOptions
from camcli.pipeline import (
    ImageWriter, Plan, RunResult, error_record, finish, open_records, output_stems, source_key,
)
from camcli.records import summary_name
from camcli.session import Session

INSTALL_HINT = "--ray needs Ray Data, an optional extra: pip install 'camcli[ray]' (or pip install 'ray[data]')"


def require_ray() -> None:
    """UsageError (exit 2) with the install command when Ray Data is not installed."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL_HINT) from None


def decode_row(row: dict[str, Any], preprocess: Preprocess) -> dict[str, Any]:
    """In a Ray task: read and decode one image, resize it for the model; an unreadable file
    becomes an error text (its record says why), never a failed task."""
    item = ImageDataset([ImageSource(Path(row["file"]), Path(row["rel"]))], preprocess)[0]
    if item["error"] is not None:
        return {**row, "image": np.zeros((1, 1, 3), np.uint8), "tensor": np.zeros((3, 1, 1), np.uint8),
                "error": item["error"].replace(row["file"], row["path"])}
    return {**row, "image": item["image"], "tensor": item["tensor"].numpy(), "error": ""}


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
        records: list[dict[str, Any]] = []
        groups: dict[tuple[int, ...], list[tuple[dict[str, Any], int]]] = defaultdict(list)
        for i in range(len(batch["key"])):
            ident = {"path": str(batch["path"][i]), "rel": str(batch["rel"][i]), "key": str(batch["key"][i])}
            if batch["error"][i]:
                records.append(error_record(ident, str(batch["error"][i])))
            else:
                groups[tuple(batch["tensor"][i].shape)].append((ident, i))
        for group in groups.values():  # images of one input shape share a forward pass
            tensors = [torch.from_numpy(np.array(batch["tensor"][i])) for _, i in group]
            outs = self.writer.explain(tensors, [np.asarray(batch["image"][i]).shape[:2] for _, i in group])
            if isinstance(outs, str):
                records.extend(error_record(ident, outs) for ident, _ in group)
                continue
            for (ident, i), tensor, out in zip(group, tensors, outs):
                rgb = np.array(batch["image"][i])
                rec = self.writer.record(ident, rgb, tensor, out)
                try:
                    records.append(self.writer.write(rec, rgb, out, Path(str(batch["stem"][i]))))
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


def explain_on_ray(
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
    driver = Session.open(opts, device="cpu")  # its options as given (--device included): what the run records
    started_here = connect(opts.ray)
    try:
        actors, gpus = actor_pool(opts.device)
        sources = plan.sources
        stems = output_stems(sources)
        keys = [source_key(s) for s in sources]
        kind = "GPU" if gpus else "CPU"
        stream, reused = open_records(driver, plan, out_dir, keys, device=f"ray: {actors} {kind} actor(s)")
        todo = [i for i, k in enumerate(keys) if k not in reused]
        if on_start is not None:
            on_start(len(todo))
        if reused:
            driver.warn(f"--skip-existing: {len(reused)} of {len(sources)} images already done")
        ray.data.DataContext.get_current().enable_progress_bars = False  # camcli shows its own
        logging.getLogger("ray.data").setLevel(logging.ERROR if opts.quiet else logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": on purpose
        items = [{"path": str(sources[i].path), "file": str(sources[i].path.resolve()), "rel": sources[i].rel.as_posix(),
                  "key": keys[i], "stem": stems[i].as_posix()} for i in todo]
        actor_options = {**dataclasses.asdict(opts), "ray": None}

        def body() -> None:
            if not items:
                return
            # Half a CPU per decoding task: other resources than the actors' keep Ray Data from fusing
            # decoding into the actors, so images are read and decoded in tasks while actors compute.
            ds = ray.data.from_items(items).map(decode_row, fn_kwargs={"preprocess": driver.preprocess}, num_cpus=0.5)
            ds = ds.map_batches(
                CamActor, batch_size=opts.batch_size, batch_format="numpy",
                fn_constructor_kwargs={"options": actor_options, "out_dir": str(out_dir.resolve()), "cwd": os.getcwd()},
                compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus, num_cpus=1,
            )
            for row in ds.iter_rows():
                rec = json.loads(row["record"])
                if "output_error" in rec:
                    raise OutputError(rec["output_error"])
                stream.add(rec)
                if progress is not None:
                    progress(1)
                if rec["status"] != "ok" and opts.fail_fast:
                    break

        return finish(stream, out_dir / summary_name(plan.shard), body, len(sources))
    finally:
        if started_here:
            ray.shutdown()
