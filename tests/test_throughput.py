"""What keeps the device busy: cheap statistics."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest

import camcli.stats as S
from camcli.render import upsample


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
