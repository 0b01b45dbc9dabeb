"""check's full-resolution rules measured a band at a time equal the same rules on the whole map."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest

import camcli.fullmap as FM
from camcli.render import row_tiles, upsample
from camcli.sanity import pearson

H, W = 301, 457


@pytest.fixture(autouse=True)
def small_bands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands of 10 rows or so, so every measurement crosses many band boundaries."""
    monkeypatch.setattr(FM, "row_tiles", partial(row_tiles, tile_pixels=10 * W))


@pytest.mark.parametrize("seed", range(5))
def test_region_facts_equal_the_whole_map(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cam = (rng.random((7, 11)) * 2 - 0.5).astype(np.float32)  # signed: the energy counts positives only
    mask = np.zeros((H, W), bool)
    mask[rng.integers(0, 150):rng.integers(150, H), rng.integers(0, 200):rng.integers(200, W)] = True
    full = upsample(cam, H, W)
    pos = np.clip(full, 0, None)
    facts = FM.region_facts(cam, mask)
    assert facts.total == pytest.approx(float(pos.sum(dtype=np.float64)), rel=1e-6)
    assert facts.inside == pytest.approx(float(pos[mask].sum(dtype=np.float64)), rel=1e-6)
    py, px = np.unravel_index(int(full.argmax()), full.shape)
    assert facts.peak == (px, py) and facts.peak_inside == bool(mask[py, px])


def test_an_equal_maximum_in_a_later_band_is_not_the_peak() -> None:
    facts = FM.region_facts(np.ones((3, 3), np.float32), np.zeros((H, W), bool))
    assert facts.peak == (0, 0) and facts.total == pytest.approx(H * W)


def test_baseline_pearson_equals_the_whole_map_and_reads_a_memory_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cam = rng.random((7, 11)).astype(np.float32)
    base = (upsample(cam, H, W) + rng.normal(0, 0.2, (H, W))).astype(np.float32)
    np.save(tmp_path / "b.npy", base)
    stored = FM.load_baseline(tmp_path / "b.npy")
    assert isinstance(stored, np.memmap)
    assert FM.baseline_pearson(cam, stored) == pytest.approx(pearson(upsample(cam, H, W), base), abs=1e-9)
    assert FM.baseline_pearson(cam, np.zeros((H, W), np.float32)) == 0.0  # a constant baseline
    assert FM.load_baseline(tmp_path / "none.npy") is None
