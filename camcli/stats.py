"""Map statistics recorded in the summary, at the image's full resolution."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

# What a blank map's reason code (camcli.maps.EMPTY / CONSTANT) means, in the user's words.
NOTES = {
    "empty": "the map is empty: every weighted activation is <= 0 after ReLU "
    "(wrong class, a saturated layer, or a layer too close to the output); try --signed or another layer",
    "constant": "the map is constant: the layer carries no spatial information for this target",
}


def note_text(code: str | None, method: str | None = None) -> str | None:
    """The sentence for a reason code, naming the method when given."""
    if code is None:
        return None
    text = NOTES.get(code, code)
    return f"{method}: {text}" if method else text


def map_stats(cam: np.ndarray, empty: bool = False) -> dict[str, Any]:
    """Peak, energy centroid, share of energy in the top 10% of pixels, hottest-region box.

    Energy is the map's value (after ReLU and normalisation). ``bbox`` is the box [x0, y0, x1, y1]
    (inclusive-exclusive) of the connected region >= 0.5 that holds the peak.

    Measured on the float32 map with float64 sums, the box by cv2.boundingRect of the peak's
    component: no float64 copy of the map and no list of the region's pixels (several times faster
    than the straightforward definition, the same values; tests/test_throughput.py compares them).
    """
    h, w = cam.shape
    pos = np.asarray(cam, dtype=np.float32)  # no float64 copy of the map: sums are taken in float64
    if pos.size and float(pos.min()) < 0:
        pos = np.maximum(pos, 0)
    flat = pos.ravel()
    total = float(flat.sum(dtype=np.float64))
    if empty or total <= 0:
        return {"empty": True, "peak": None, "centroid": None, "top10_energy_share": 0.0, "bbox": None, "mean": 0.0}
    peak_i = int(flat.argmax())
    py, px = divmod(peak_i, w)
    cy = float(pos.sum(axis=1, dtype=np.float64) @ np.arange(h) / total)
    cx = float(pos.sum(axis=0, dtype=np.float64) @ np.arange(w) / total)
    k = max(1, int(round(0.1 * flat.size)))
    top = np.partition(flat, flat.size - k)[flat.size - k :]
    mask = (pos >= 0.5 * flat[peak_i]).view(np.uint8)
    _, labels = cv2.connectedComponents(mask, connectivity=8)
    # The box of the peak's component, without listing its pixels.
    x0, y0, bw, bh = cv2.boundingRect((labels == labels[py, px]).view(np.uint8))
    return {
        "empty": False,
        "peak": [px, py],
        "centroid": [round(cx, 2), round(cy, 2)],
        "top10_energy_share": round(float(top.sum(dtype=np.float64)) / total, 6),
        "bbox": [x0, y0, x0 + bw, y0 + bh],
        "mean": round(total / flat.size, 6),
    }


def energy_in_box(cam: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of the map's (positive) energy inside box [x0, y0, x1, y1)."""
    pos = np.clip(cam, 0, None)
    total = float(pos.sum())
    if total <= 0:
        return 0.0
    x0, y0, x1, y1 = box
    return float(pos[y0:y1, x0:x1].sum() / total)


STATS_MAX_PIXELS = 1 << 22  # maps of larger images are measured at a reduced resolution


def image_map_stats(cam: np.ndarray, height: int, width: int, empty: bool = False) -> dict[str, Any]:
    """map_stats of ``cam`` upsampled to the image's (height, width), in the image's pixels.

    Up to STATS_MAX_PIXELS the map is measured at full resolution; a larger image's map (a bilinear
    upsampling of a feature map, so nothing is lost) is measured at that many pixels and its
    positions scaled back, so memory does not grow with the image.
    """
    s = min(1.0, (STATS_MAX_PIXELS / (height * width)) ** 0.5)
    sh, sw = max(1, round(height * s)), max(1, round(width * s))
    small = cam.astype(np.float32, copy=False)
    if small.shape != (sh, sw):
        small = cv2.resize(small, (sw, sh), interpolation=cv2.INTER_LINEAR)
    st = map_stats(small, empty)
    if (sh, sw) == (height, width) or st["peak"] is None:
        return st
    fx, fy = width / sw, height / sh
    px, py = st["peak"]
    cx, cy = st["centroid"]
    x0, y0, x1, y1 = st["bbox"]
    st["peak"] = [min(width - 1, int((px + 0.5) * fx)), min(height - 1, int((py + 0.5) * fy))]
    st["centroid"] = [round((cx + 0.5) * fx - 0.5, 2), round((cy + 0.5) * fy - 0.5, 2)]
    st["bbox"] = [int(x0 * fx), int(y0 * fy), min(width, int(np.ceil(x1 * fx))), min(height, int(np.ceil(y1 * fy)))]
    return st
