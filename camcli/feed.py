"""The one feed every command reads its images through.

It finds the inputs (files, folders, globs; the output folder excluded) and takes this shard's share
(:func:`find_inputs`), decodes them in worker processes with ``--max-pixels`` checked from the header
(:class:`Decoder`, :func:`feed`), and cuts batches of one input shape under the pixel budget
(:func:`cut_batches`). explain, check and evaluate read :func:`feed`; the Ray runner decodes in Ray
tasks with the same :class:`Decoder` and cuts its actors' batches with the same :func:`cut_batches`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from camcli.errors import ImageError
from camcli.images import DEFAULT_MAX_PIXELS, ImageSource, Preprocess, find_images, read_image, worker_ignores_interrupts
from camcli.options import parse_shard

# Decoded full-resolution pixels held at once by images waiting for their batch, and again by
# overlays waiting to be written: batches are cut short, and writes wait, beyond it. An image larger
# than the budget goes alone. Memory then follows the largest image, not image size x batch size.
PIXEL_BUDGET = 1 << 26  # 64 Mpx: 192 MB of RGB


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and job schedulers set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def auto_workers() -> int:
    """Decoding workers when --workers is not given: none on 2 cores or fewer, else up to 4."""
    cores = available_cores()
    return 0 if cores <= 2 else min(4, cores // 2)


def decoding_workers(requested: int | None, warn: Callable[[str], None]) -> int:
    """The decoding worker processes for a run: ``requested`` (--workers) capped at the cores this
    process may run on, with a warning when capped (more would only compete for them), or
    auto_workers() when not given."""
    if requested is None:
        return auto_workers()
    cores = available_cores()
    if requested > cores:
        warn(f"--workers {requested}: this process may run on {cores} core(s); using {cores} decoding workers")
        return cores
    return requested


def shard_of(rel: Path, n: int) -> int:
    """The shard (1..n) an input belongs to: a stable hash of its relative path, the same on every machine."""
    digest = hashlib.sha1(rel.as_posix().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n + 1


def select_shard(sources: Sequence[ImageSource], spec: str | None) -> list[ImageSource]:
    if spec is None:
        return list(sources)
    k, n = parse_shard(spec)
    return [s for s in sources if shard_of(s.rel, n) == k]


@dataclass
class Inputs:
    """The inputs of one run: this shard's share of those found, and the folder entries passed over."""

    sources: list[ImageSource]
    total: int  # inputs found before sharding
    shard: tuple[int, int] | None = None
    skipped: list[str] = field(default_factory=list)  # folder entries that are no regular files
    found: list[ImageSource] | None = field(default=None, repr=False)  # every input, before sharding


def find_inputs(paths: Sequence[str | Path], recursive: bool, out_dir: Path | None, shard: str | None = None) -> Inputs:
    """Files, folders and globs -> this shard's sources (UsageError when there are none to find)."""
    names: set[str] = set()
    if out_dir is not None:  # the output folder's maps are named after the methods
        from camcli.methods import available_methods

        names = {m.name.replace("+", "p") for m in available_methods()}
    found = find_images(paths, recursive, exclude=out_dir, method_files=names)
    return Inputs(select_shard(found.sources, shard), len(found.sources),
                  parse_shard(shard) if shard is not None else None, [str(s) for s in found.skipped], found.sources)


@dataclass
class Item:
    """One decoded input, or why it could not be decoded (``error``)."""

    index: int  # its position in the feed's sources
    tensor: torch.Tensor | None = None  # (3, h, w) uint8 at the model's input size
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB at full resolution; None when not kept
    size: tuple[int, int] = (0, 0)  # (height, width) of the image in the file
    note: str | None = None  # how it was read (an animation's first frame), for its record
    error: str | None = None

    @property
    def pixels(self) -> int:
        """What it holds against the pixel budget: its full-resolution image, else its model input."""
        if self.image is not None:
            return int(self.image.shape[0] * self.image.shape[1])
        return 0 if self.tensor is None else int(self.tensor.shape[-2] * self.tensor.shape[-1])


@dataclass
class Batch:
    """Decoded inputs of one shape: one forward pass."""

    items: list[Item]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [i.tensor for i in self.items]  # type: ignore[misc]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [i.size for i in self.items]


@dataclass(frozen=True)
class Decoder:
    """The decoding step: read one file (``--max-pixels`` checked from its header, before any pixel
    is decoded) and resize it for the model. ``full_images``: keep the full-resolution RGB for
    overlays; without it, large images are decoded no larger than the model input needs. A bad file
    becomes an Item with its error, never an exception."""

    preprocess: Preprocess
    max_pixels: int = DEFAULT_MAX_PIXELS
    full_images: bool = True

    def __call__(self, index: int, source: ImageSource) -> Item:
        pre = self.preprocess
        try:
            if self.full_images:
                d = read_image(source.path, self.max_pixels)
                return Item(index, pre.resize(d.rgb), d.rgb, d.size, d.note)
            d = read_image(source.path, self.max_pixels, fit=pre.input_hw)
            return Item(index, pre.resize(d.rgb, pre.input_hw(*d.size)), None, d.size, d.note)
        except ImageError as e:
            return Item(index, error=str(e))
        except Exception as e:  # noqa: BLE001 - one bad file must not stop a batch run
            return Item(index, error=f"{source.path}: {e}")


class _Decoding(torch.utils.data.Dataset):
    """The Decoder over some of the sources, for DataLoader workers."""

    def __init__(self, sources: Sequence[ImageSource], indices: Sequence[int], decoder: Decoder) -> None:
        self.sources, self.indices, self.decoder = sources, list(indices), decoder

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Item:
        i = self.indices[k]
        return self.decoder(i, self.sources[i])


def _one(items: list[Item]) -> Item:
    return items[0]


def decoded(
    sources: Sequence[ImageSource], decoder: Decoder, *, workers: int | None = None, indices: Sequence[int] | None = None
) -> Iterator[Item]:
    """Each source (or those at ``indices``) decoded, in order, by ``workers`` processes (default:
    auto_workers(); 0: in this process). The workers stop when the iterator is closed."""
    n = auto_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(
        _Decoding(sources, range(len(sources)) if indices is None else indices, decoder),
        batch_size=1,  # one image per fetch: batches are cut by shape and pixel budget (cut_batches)
        num_workers=n,
        worker_init_fn=worker_ignores_interrupts if n else None,
        collate_fn=_one,
        pin_memory=False,  # stack_images builds each batch in page-locked memory on CUDA: one copy, not two
    )
    it = iter(loader)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def cut_batches(items: Iterable[Item], batch_size: int, budget: int = PIXEL_BUDGET) -> Iterator[Item | Batch]:
    """Decoded items -> batches of one input shape, and failed items (error set) as they come.

    Images of one shape wait in their own bucket until it holds ``batch_size``. A batch stays within
    ``budget`` pixels (an image larger than it goes alone): when the next image would exceed it, the
    bucket holding the most pixels runs first. More than twice ``batch_size`` images waiting runs the
    fullest bucket. The caller may stop at any point (--fail-fast): what waits is dropped.
    """
    pending: dict[tuple[int, ...], list[Item]] = {}

    def held(bucket: list[Item]) -> int:
        return sum(i.pixels for i in bucket)

    def held_total() -> int:
        return sum(held(v) for v in pending.values())

    for item in items:
        if item.error is not None:
            yield item
            continue
        pixels = item.pixels
        while pending and held_total() + pixels > budget:
            yield Batch(pending.pop(max(pending, key=lambda k: held(pending[k]))))
        shape = tuple(item.tensor.shape)  # type: ignore[union-attr]
        pending.setdefault(shape, []).append(item)
        item = None  # type: ignore[assignment]  # hold no image beyond its bucket while the next decodes
        if len(pending[shape]) >= batch_size or held_total() >= budget:
            yield Batch(pending.pop(shape))
        while sum(len(v) for v in pending.values()) > 2 * batch_size:
            yield Batch(pending.pop(max(pending, key=lambda k: len(pending[k]))))
    for shape in list(pending):
        yield Batch(pending.pop(shape))


def feed(
    sources: Sequence[ImageSource],
    decoder: Decoder,
    batch_size: int,
    *,
    workers: int | None = None,
    indices: Sequence[int] | None = None,
    budget: int = PIXEL_BUDGET,
) -> Iterator[Item | Batch]:
    """The sources decoded in workers and cut into batches: every command's input loop. Closing it
    (or leaving it at an exception) stops the decoding workers at once."""
    items = decoded(sources, decoder, workers=workers, indices=indices)
    try:
        yield from cut_batches(items, batch_size, budget)
    finally:
        items.close()
