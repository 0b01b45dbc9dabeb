"""The local runner: an explain run in this process, on the run layer (camcli/run.py).

Decoding runs in worker processes (camcli/feed.py), the engine computes a batch at a time, and a
writer pool upsamples, renders and writes while the next batch computes. Each finished image's
record is appended to records.jsonl and counted; nothing of it is kept in memory, so memory stays
flat however many images a run has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from camcli.engine import ImageOutput
from camcli.errors import OutputError
from camcli.feed import PIXEL_BUDGET, Batch, Decoder, available_cores, decoding_workers, feed
from camcli.records import output_files
from camcli.run import ImageWriter, Plan, RunResult, error_record, remove_files, start_run
from camcli.session import Session
from camcli.writer import WriterPool


def writer_threads(decoders: int) -> int:
    """Threads that render, measure and write while the engine computes: the cores left after the
    decoding processes and the main thread, at least 2 and at most 32. OpenCV, zlib and numpy release
    the GIL for that work, so the threads run in parallel."""
    return max(2, min(32, available_cores() - decoders - 1))


def writer_queue(batch_size: int, threads: int) -> int:
    """Images waiting for a writer thread at most: a few batches, and enough to keep every thread busy.
    The pixel budget bounds the same queue by size (see run_local's submit_write)."""
    return max(4 * batch_size, 2 * threads)


def run_local(
    session: Session,
    plan: Plan,
    out_dir: Path,
    *,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunResult:
    """The run itself, in this process, while the caller holds the output folder."""
    opts = session.options
    run = start_run(session, plan, out_dir, on_start=on_start)
    writer = ImageWriter(session, out_dir)
    writing: list[tuple[Any, int]] = []  # (future, full-resolution pixels) of writes in flight

    def submit_write(pool: WriterPool, i: int, rec: dict[str, Any], rgb: np.ndarray, out: ImageOutput) -> None:
        """Hand an image to the writers, first waiting for the oldest writes beyond the pixel budget."""
        pixels = rgb.shape[0] * rgb.shape[1]
        while writing and (writing[0][0].done() or sum(p for _, p in writing) + pixels > PIXEL_BUDGET):
            writing.pop(0)[0].result()
        writing.append((pool.submit(write_one, i, rec, rgb, out), pixels))

    def write_one(i: int, rec: dict[str, Any], rgb: np.ndarray, out: ImageOutput) -> None:
        """In a writer thread: render and write, then append the finished record."""
        writer.write(rec, rgb, out, run.stems[i])  # OutputError: nothing of this image stays
        try:
            run.stream.add(rec)
        except OutputError:
            remove_files([out_dir / f for f in output_files(rec)])
            raise

    def run_batch(batch: Batch, pool: WriterPool) -> bool:
        """Explain one same-shape batch; False when --fail-fast should stop the run."""
        pool.check()  # a write failed: stop now
        outs = writer.maps_or_error(batch.tensors, batch.sizes)
        if isinstance(outs, str):
            for item in batch.items:
                run.stream.add(error_record(run.ident(item.index), outs))
            return not opts.fail_fast
        for item, o in zip(batch.items, outs):
            rgb, item.image = item.image, None  # the writer holds the only reference from here on
            assert rgb is not None
            rec = writer.record(run.ident(item.index), rgb, item.tensor, o, item.note)
            submit_write(pool, item.index, rec, rgb, o)
        if progress is not None:
            progress(len(batch.items))
        return True

    workers = decoding_workers(opts.workers, session.warn)
    threads = writer_threads(workers)
    decoder = Decoder(session.preprocess, opts.max_pixels)

    def body() -> None:
        batches = feed(plan.sources, decoder, opts.batch_size, workers=workers, indices=run.todo, budget=PIXEL_BUDGET)
        try:
            # Bounded twice: by count (writer_queue) and by decoded pixels (PIXEL_BUDGET, in submit_write).
            with WriterPool(workers=threads, max_pending=writer_queue(opts.batch_size, threads)) as pool:
                for got in batches:
                    if isinstance(got, Batch):
                        if not run_batch(got, pool):
                            break
                        continue
                    run.stream.add(error_record(run.ident(got.index), got.error or ""))
                    if progress is not None:
                        progress(1)
                    if opts.fail_fast:
                        break
                pool.drain()
        finally:
            batches.close()  # the decoding workers stop, after the writer pool (queued writes cancelled first)

    return run.finish(body)
