"""What `check` reads of a map at the image's full resolution, measured a band of rows at a time.

A check rule is about image pixels: the share of the map's positive energy inside a region, where
its peak lies, its Pearson correlation with a stored baseline of the same size. Building the
full-resolution float map (and float64 copies of it and of the baseline for the correlation) took
about 20 bytes per pixel, 5 GB for a 16000 x 16000 image. Here the map is upsampled band by band
(``render.Upsampler``, the same values as ``render.upsample``) and the baseline is read through a
memory map, so memory follows one band, not the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camcli.render import Upsampler, row_tiles


@dataclass(frozen=True)
class RegionFacts:
    total: float  # the map's positive energy over the whole image
    inside: float  # the same inside the region
    peak: tuple[int, int]  # (x, y) of the map's maximum (the first one in row-major order)
    peak_inside: bool


def region_facts(cam: np.ndarray, mask: np.ndarray) -> RegionFacts:
    """Energy and peak of ``cam`` upsampled to ``mask``'s (H, W) size, against the boolean mask."""
    h, w = mask.shape
    up = Upsampler(cam, h, w)
    total = inside = 0.0
    best, peak = -np.inf, (0, 0)
    for y0, y1 in row_tiles(h, w):
        band = up.rows(y0, y1)
        pos = np.clip(band, 0, None)
        total += float(pos.sum(dtype=np.float64))
        inside += float(pos[mask[y0:y1]].sum(dtype=np.float64))
        i = int(band.argmax())
        if band.flat[i] > best:  # strictly: an equal maximum in a later band is not the first
            best, peak = float(band.flat[i]), (i % w, y0 + i // w)
    return RegionFacts(total, inside, peak, bool(mask[peak[1], peak[0]]))


def baseline_pearson(cam: np.ndarray, baseline: np.ndarray) -> float:
    """Pearson's r between ``cam`` upsampled to the baseline's (H, W) and the baseline (a memory map
    is read a band at a time); two passes, centred, in float64. 0.0 when either is constant."""
    h, w = baseline.shape
    up = Upsampler(cam, h, w)
    n = h * w
    mx = my = 0.0
    for y0, y1 in row_tiles(h, w):
        mx += float(up.rows(y0, y1).sum(dtype=np.float64))
        my += float(np.asarray(baseline[y0:y1]).sum(dtype=np.float64))
    mx, my = mx / n, my / n
    sxy = sxx = syy = 0.0
    for y0, y1 in row_tiles(h, w):
        x = up.rows(y0, y1).astype(np.float64) - mx
        y = np.asarray(baseline[y0:y1], dtype=np.float64) - my
        sxy += float((x * y).sum())
        sxx += float((x * x).sum())
        syy += float((y * y).sum())
    den = float(np.sqrt(sxx * syy))
    return sxy / den if den > 0 else 0.0


def baseline_problem(path: Path) -> str | None:
    """What is wrong with a stored baseline file, None when it is usable: a readable ``.npy`` header,
    a 2-D array of real numbers, as many bytes as the header says (a truncated copy has fewer), and
    finite values only (read through a memory map a band of rows at a time)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (OSError, ValueError) as e:
        return f"not a readable .npy file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if len(shape) != 2:
        return f"holds an array of shape {tuple(shape)}, not a 2-D map (height, width)"
    if dtype.kind not in "fiu":
        return f"holds {dtype} values, not real numbers"
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        return f"is truncated: {size} bytes, its header ({shape[0]}x{shape[1]} {dtype}) needs {need}"
    if dtype.kind == "f" and shape[0] * shape[1] > 0:
        data = np.load(path, mmap_mode="r")
        h, w = shape
        for y0, y1 in row_tiles(h, w):
            band = np.asarray(data[y0:y1])
            if not np.isfinite(band).all():
                bad = ~np.isfinite(band)
                y, x = divmod(int(bad.argmax()), w)
                return (f"holds non-finite values ({int(bad.sum())}+ of them; first {band.flat[bad.argmax()]} "
                        f"at x={x}, y={y0 + y})")
    return None


def load_baseline(path: Path) -> np.ndarray | None:
    """A stored baseline map as a read-only memory map (nothing read yet), None if there is none."""
    return np.load(path, mmap_mode="r") if path.is_file() else None
