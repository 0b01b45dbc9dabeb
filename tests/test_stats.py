"""Map statistics against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from camcli.stats import energy_in_box, map_stats


def test_stats_by_hand() -> None:
    cam = np.zeros((4, 10), np.float32)
    cam[1, 2] = 1.0  # peak
    cam[1, 3] = 0.6  # joins the peak's region (>= 0.5)
    cam[3, 8] = 0.4  # below half the peak: not in the hottest region
    s = map_stats(cam)
    assert s["peak"] == [2, 1]
    total = 2.0
    assert s["centroid"] == [pytest.approx((2 * 1 + 3 * 0.6 + 8 * 0.4) / total), pytest.approx((1 * 1.6 + 3 * 0.4) / total)]
    # top 10% of 40 pixels = 4 pixels = all the energy here
    assert s["top10_energy_share"] == pytest.approx(1.0)
    assert s["bbox"] == [2, 1, 4, 2]
    assert s["mean"] == pytest.approx(2.0 / 40)
    assert energy_in_box(cam, (0, 0, 5, 2)) == pytest.approx(0.8)


def test_empty_map_stats() -> None:
    s = map_stats(np.zeros((3, 3), np.float32), empty=True)
    assert s["empty"] and s["peak"] is None and s["top10_energy_share"] == 0.0
