"""What keeps the device busy: writer threads sized by the cores, bounded queues, cheap statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

import camcli.stats as S
from camcli import feed, local_runner, pipeline
from camcli.images import stack_images
from camcli.render import upsample
from conftest import noise_images


@pytest.mark.parametrize("cores,decoders,threads", [(2, 0, 2), (1, 0, 2), (16, 4, 11), (64, 4, 32)])
def test_writer_threads_follow_the_cores_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch, cores: int, decoders: int, threads: int
) -> None:
    monkeypatch.setattr(feed.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert feed.available_cores() == cores
    assert local_runner.writer_threads(decoders) == threads
    assert feed.auto_workers() == (0 if cores <= 2 else min(4, cores // 2))


class Spy:
    """Records how explain sizes its WriterPool and what waits in it (count and pixels)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: dict[str, Any] = {"most_pending": 0, "most_pixels": 0, "largest": 0}
        seen, real = self.seen, local_runner.WriterPool

        class Pool(real):  # type: ignore[misc, valid-type]
            def __init__(self, workers: int, max_pending: int) -> None:
                seen.update(workers=workers, max_pending=max_pending)
                self.sizes: dict[Any, int] = {}
                super().__init__(workers=workers, max_pending=max_pending)

            def submit(self, fn, *args):  # noqa: ANN001, ANN002, ANN201
                pixels = args[2].shape[0] * args[2].shape[1]  # write_one(i, rec, rgb, out)
                waiting = [f for f in self._pending if not f.done()]
                seen["most_pending"] = max(seen["most_pending"], len(waiting) + 1)
                seen["most_pixels"] = max(seen["most_pixels"], sum(self.sizes[f] for f in waiting) + pixels)
                seen["largest"] = max(seen["largest"], pixels)
                fut = super().submit(fn, *args)
                self.sizes[fut] = pixels
                return fut

        monkeypatch.setattr(local_runner, "WriterPool", Pool)


def test_explain_sizes_its_writer_pool_and_bounds_its_queue(
    monkeypatch: pytest.MonkeyPatch, small_images: Path, tmp_path: Path
) -> None:
    monkeypatch.setattr(feed.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    spy = Spy(monkeypatch)
    res = pipeline.run_explain([small_images], pipeline.ExplainOptions(model="toymodels:tiny_cnn", out=str(tmp_path / "out"),
                                                                   workers=0, batch_size=1, quiet=True))
    assert res.summary["counts"]["ok"] == 2
    assert spy.seen["workers"] == 7  # 8 cores, no decoding processes, the main thread
    assert spy.seen["max_pending"] == 14 and spy.seen["most_pending"] <= 14


def test_more_writer_threads_keep_the_pixel_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """However many threads write, the overlays waiting for them hold at most PIXEL_BUDGET pixels."""
    monkeypatch.setattr(feed.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(local_runner, "PIXEL_BUDGET", 3 * 1600)  # three 40x40 images
    spy = Spy(monkeypatch)
    folder = noise_images(tmp_path / "imgs", [(40, 40)] * 12 + [(80, 80)], seed=2)
    res = pipeline.run_explain([folder], pipeline.ExplainOptions(model="toymodels:tiny_cnn", out=str(tmp_path / "out"),
                                                             workers=0, batch_size=4, quiet=True))
    assert res.summary["counts"]["ok"] == 13
    assert spy.seen["workers"] == 32 and spy.seen["max_pending"] == 64
    assert spy.seen["largest"] == 6400  # larger than the budget: it went alone
    assert spy.seen["most_pixels"] <= max(local_runner.PIXEL_BUDGET, spy.seen["largest"])


def reference_stats(cam: np.ndarray, empty: bool = False) -> dict[str, Any]:
    """The straightforward definition of the summary's statistics (float64 copy, every region pixel)."""
    h, w = cam.shape
    pos = np.clip(cam, 0, None).astype(np.float64)
    total = float(pos.sum())
    if empty or total <= 0:
        return {"empty": True, "peak": None, "centroid": None, "top10_energy_share": 0.0, "bbox": None, "mean": 0.0}
    flat = pos.ravel()
    py, px = divmod(int(flat.argmax()), w)
    k = max(1, int(round(0.1 * flat.size)))
    _, labels = cv2.connectedComponents((pos >= 0.5 * pos.max()).astype(np.uint8), connectivity=8)
    rys, rxs = np.nonzero(labels == labels[py, px])
    return {
        "empty": False,
        "peak": [px, py],
        "centroid": [round(float(pos.sum(axis=0) @ np.arange(w) / total), 2),
                     round(float(pos.sum(axis=1) @ np.arange(h) / total), 2)],
        "top10_energy_share": round(float(np.sort(flat)[-k:].sum() / total), 6),
        "bbox": [int(rxs.min()), int(rys.min()), int(rxs.max()) + 1, int(rys.max()) + 1],
        "mean": round(float(pos.mean()), 6),
    }


def random_maps(n: int, seed: int) -> list[np.ndarray]:
    """Feature-resolution maps in [0, 1] of random shapes and sharpness; every fourth one signed."""
    rng = np.random.default_rng(seed)
    maps = []
    for i in range(n):
        small = rng.random(tuple(rng.integers(2, 14, 2))).astype(np.float32) ** rng.uniform(0.5, 4)
        small = (small - small.min()) / (small.max() - small.min())
        maps.append(small * 2 - 1 if i % 4 == 0 else small)  # a signed map: negative evidence carries no energy
    return maps


def test_fast_map_stats_equal_the_straightforward_definition() -> None:
    rng = np.random.default_rng(0)
    for i, small in enumerate(random_maps(150, 0)):
        full = upsample(small, *rng.integers(10, 500, 2))
        assert S.map_stats(full) == reference_stats(full), i
    blank = np.zeros((5, 6), np.float32)
    assert S.map_stats(blank) == reference_stats(blank) and S.map_stats(blank + 1, empty=True)["empty"]


@pytest.mark.parametrize("bound", [S.STATS_MAX_PIXELS, 4000])  # full resolution, and measured reduced
def test_image_statistics_of_the_banded_pipeline_equal_the_straightforward_definition(
    monkeypatch: pytest.MonkeyPatch, bound: int
) -> None:
    """What explain records for an image (image_map_stats: the map at the image's size, or at a bounded
    size with positions scaled back) is the same with the fast map_stats as with the old definition."""
    monkeypatch.setattr(S, "STATS_MAX_PIXELS", bound)
    rng = np.random.default_rng(1)
    cases = [(m, *rng.integers(30, 400, 2)) for m in random_maps(60, 1)]
    fast = [S.image_map_stats(m, h, w) for m, h, w in cases]
    monkeypatch.setattr(S, "map_stats", reference_stats)
    assert fast == [S.image_map_stats(m, h, w) for m, h, w in cases]


def test_batches_are_stacked_channels_last_in_one_copy() -> None:
    rng = np.random.default_rng(1)
    images = [torch.from_numpy(rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)).permute(2, 0, 1) for _ in range(3)]
    batch = stack_images(images, torch.device("cpu"))
    assert torch.equal(batch, torch.stack(images))
    assert batch.is_contiguous(memory_format=torch.channels_last)
    nchw = [im.contiguous() for im in images]  # tensors laid out otherwise stack to the same values
    assert torch.equal(stack_images(nchw), torch.stack(images))
