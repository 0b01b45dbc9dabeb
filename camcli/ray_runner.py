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
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from camcli.errors import OutputError, UsageError
from camcli.feed import Batch, Decoder, Item, cut_batches
from camcli.images import ImageSource
from camcli.options import ExplainOptions
from camcli.run import ImageWriter, Plan, RunResult, error_record, remove_files, start_run
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

    def __init__(self, options: dict[str, Any], out_dir: str, cwd: str, journal: str | None = None) -> None:
        from camcli.allocator import keep_heap_memory  # here: importing camcli leaves the process as it is

        keep_heap_memory()  # the actor owns its worker process, as the command owns its own (camcli.allocator)
        if os.path.isdir(cwd):  # relative --weights/--labels and module:callable models, as on the driver
            os.chdir(cwd)
            sys.path.insert(0, cwd)
        self.session = Session.open(ExplainOptions(**options))
        self.writer = ImageWriter(self.session, Path(out_dir))
        # The records of the images whose files this actor wrote, as they are written: an interrupted
        # driver adopts the ones it never received (adopt_journals), so no file stays without a record.
        self.journal = None
        if journal is not None:
            Path(journal).mkdir(parents=True, exist_ok=True)
            self.journal = open(Path(journal) / f"{os.getpid()}-{id(self):x}.jsonl", "a", encoding="utf-8")  # noqa: SIM115

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
                if self.journal is not None:
                    self.journal.write(json.dumps(records[-1]) + "\n")
                    self.journal.flush()
        return records


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a cluster address (``HOST:PORT``, ``ray://HOST:PORT``, or ``RAY_ADDRESS`` for
    the default); None where Ray finds or starts the cluster itself (auto, local, nothing set)."""
    if address == "default":
        address = os.environ.get("RAY_ADDRESS", "").strip() or "local"
    if address in ("auto", "local"):
        return None
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray {address!r} is not a Ray address (accepted: auto, HOST:PORT or ray://HOST:PORT)")
    return host.strip("[]"), int(port)


def wait_for_cluster(address: str, timeout: float) -> None:
    """Until ``timeout`` seconds have passed, try to open a TCP connection to the cluster's address;
    UsageError (exit 2) when nothing answers by then, or at once for a host that does not resolve.
    ray.init itself retries a refused connection for ever."""
    where = _host_port(address)
    if where is None:
        return
    host, port = where
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            socket.create_connection((host, port), timeout=max(0.1, min(5.0, left))).close()
            return
        except socket.gaierror as e:
            raise UsageError(f"--ray {address!r}: unknown host {host!r} ({e.strerror})") from None
        except OSError as e:
            why = e.strerror or type(e).__name__
        if time.monotonic() >= deadline:
            raise UsageError(
                f"--ray {address!r}: no Ray cluster answered at {host}:{port} within {timeout:g} s ({why}); start one "
                "there (ray start --head), check the address, or wait longer with --ray-timeout SECONDS"
            )
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def connect(address: str, timeout: float = 60.0) -> bool:
    """Connect to (or start) Ray; True when this call started it (and must shut it down).
    ``timeout``: seconds to wait for a cluster at the address to answer (``--ray-timeout``)."""
    import ray

    if ray.is_initialized():
        return False
    wait_for_cluster(address, timeout)
    try:
        ray.init(address=None if address == "default" else address, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"--ray {address!r}: cannot reach Ray: {str(e).splitlines()[0]}") from None
    return True


JOURNALS = ".camcli-ray"  # in the output folder: the actors' records of the files they wrote, while a run lasts


def adopt_journals(journal: Path, stream: Any, out_dir: Path, have: set[str]) -> int:  # noqa: ANN401 - a RecordStream
    """After an interrupted run (the actors stopped): append to ``stream`` the record of every image
    whose files an actor wrote but whose record never reached the driver, so each file on disk is
    listed, as in a local run; a record whose files are not all there has them removed instead.
    ``have``: the keys ``stream`` already holds (updated). Returns the number of records adopted."""
    from camcli.records import output_files

    adopted = 0
    for path in sorted(journal.glob("*.jsonl")) if journal.is_dir() else []:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # the line an actor was writing when it stopped
            if not isinstance(rec, dict) or rec.get("key") in have:
                continue
            files = [out_dir / f for f in output_files(rec)]
            if all(f.is_file() for f in files):
                stream.add(rec)
                have.add(rec.get("key"))
                adopted += 1
            else:
                remove_files(files)
    return adopted


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


RAY_DATA_FETCH_THREAD = "iter_threaded"  # the name Ray Data (2.x) gives the threads that fetch rows for iter_rows


def stop_iteration(rows: Iterator[Any], timeout: float = 30.0) -> None:
    """Close a Ray Data row iterator and wait (at most ``timeout`` seconds) for its fetching threads
    to end. Closing only asks them to stop after the block they are fetching; one still fetching
    when ray.shutdown() runs touches the shut-down core worker, and Ray then ends the whole process
    (exit 1, no summary): an interrupted --ray run died this way."""
    close = getattr(rows, "close", None)
    if close is not None:
        close()
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t.name == RAY_DATA_FETCH_THREAD and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))


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
    driver = Session.open(opts, device="cpu")  # its options as given (--device included): what the run records
    started_here = connect(opts.ray, opts.ray_timeout)
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
        journal = out_dir.resolve() / f"{JOURNALS}.{os.getpid()}"  # this run's: shards may share the folder
        todo = set(run.todo)
        have = {k for i, k in enumerate(run.keys) if i not in todo}  # reused from an earlier run
        decoder = Decoder(driver.preprocess, opts.max_pixels)

        def stop_and_adopt() -> None:
            """Stop the actors, then list the images whose files they wrote but whose records never
            reached the driver, as the local runner lists every image it wrote."""
            if started_here:
                ray.shutdown()
            adopted = adopt_journals(journal, run.stream, out_dir, have)
            if adopted:
                driver.warn(f"recorded {adopted} image(s) the Ray actors had finished when the run stopped")

        def body() -> None:
            try:
                if not run_actors():  # --fail-fast stopped it: actors may have gone on
                    stop_and_adopt()
            except BaseException:  # interrupted (Ctrl-C), or an output error
                stop_and_adopt()
                raise
            finally:
                shutil.rmtree(journal, ignore_errors=True)

        def run_actors() -> bool:
            """True when every image's record arrived, False when --fail-fast stopped early."""
            if not items:
                return True
            # Half a CPU per decoding task: other resources than the actors' keep Ray Data from fusing
            # decoding into the actors, so images are read and decoded in tasks while actors compute.
            ds = ray.data.from_items(items).map(decode_row, fn_kwargs={"decoder": decoder}, num_cpus=0.5)
            ds = ds.map_batches(
                CamActor, batch_size=opts.batch_size, batch_format="numpy",
                fn_constructor_kwargs={"options": actor_options, "out_dir": str(out_dir.resolve()), "cwd": os.getcwd(),
                                       "journal": str(journal)},
                compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus, num_cpus=1,
            )
            rows = iter(ds.iter_rows())
            try:
                for row in rows:
                    rec = json.loads(row["record"])
                    if "output_error" in rec:
                        raise OutputError(rec["output_error"])
                    run.stream.add(rec)
                    have.add(rec.get("key"))
                    if progress is not None:
                        progress(1)
                    if rec["status"] != "ok" and opts.fail_fast:
                        return False
                return True
            finally:
                stop_iteration(rows)

        return run.finish(body)
    finally:
        if started_here:
            ray.shutdown()
