"""Map arithmetic shared by the engine and the methods: normalising a raw map (``finalize``), fusing
the maps of several layers, and the first principal component of weighted activations.

Pure tensor functions: no model, no hooks, nothing read back from the device.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Why a map came out blank: codes here; the words users read live in camcli.stats.NOTES.
EMPTY = "empty"
CONSTANT = "constant"


# Blank-map reason codes as they travel in a (B,) uint8 tensor: index into REASONS.
REASONS: tuple[str | None, ...] = (None, EMPTY, CONSTANT)


def finalize(cam: Tensor, signed: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """ReLU (unless signed) and per-image normalisation, the same for every method.

    Returns (maps in [0, 1] or [-1, 1], empty flags (B,), reason codes (B,) uint8: an index into
    REASONS), all on the map's device: nothing here waits for the device.
    Never divides by zero: an empty or constant map comes back as zeros and is flagged.
    """
    cam = torch.nan_to_num(cam.detach().float(), nan=0.0, posinf=0.0, neginf=0.0)
    flat = cam.flatten(1)
    if signed:
        scale = flat.abs().amax(dim=1)
        ok = scale > 0
        out = cam / torch.where(ok, scale, 1.0)[:, None, None]
        code = torch.where(ok, 0, REASONS.index(CONSTANT)).to(torch.uint8)
        return out, ~ok, code
    cam = torch.relu(cam)
    flat = cam.flatten(1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    span = hi - lo
    ok = span > 1e-12 * torch.clamp(hi, min=1.0)
    out = (cam - lo[:, None, None]) / torch.where(ok, span, 1.0)[:, None, None]
    out = torch.where(ok[:, None, None], out, torch.zeros_like(out))
    blank = torch.where(hi <= 0, REASONS.index(EMPTY), REASONS.index(CONSTANT))
    code = torch.where(ok, 0, blank).to(torch.uint8)
    return out, ~ok, code


def fuse_layers(maps: Sequence[Tensor]) -> Tensor:
    """Fuse normalised per-layer maps: resize each to the finest map's size, then average.

    The same rule pytorch-grad-cam applies to several target layers; the result is normalised again.
    """
    h = max(m.shape[-2] for m in maps)
    w = max(m.shape[-1] for m in maps)
    ups = [F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0] for m in maps]
    return torch.stack(ups).mean(dim=0)


def first_component(x: Tensor) -> Tensor:
    """Project (B, K, h, w) onto its first principal component over channels -> (B, h, w).

    Positions are the samples and channels the features; the data are centred per channel. SVD's
    sign is arbitrary, so it is fixed: the map correlates positively with the channel sum of ``x``.
    """
    b, k, h, w = x.shape
    m = x.detach().float().reshape(b, k, h * w).transpose(1, 2)  # (B, hw, K)
    centred = m - m.mean(dim=1, keepdim=True)
    # The projection on the first right singular vector v equals sqrt(lambda) * u, with (lambda, u)
    # the top eigenpair of the small Gram matrix C C^T (hw x hw); when channels are fewer than
    # positions, take v from C^T C (K x K) instead. Same result as an SVD, much cheaper.
    if h * w <= k:
        vals, vecs = torch.linalg.eigh(centred @ centred.transpose(1, 2))
        proj = vecs[:, :, -1] * vals[:, -1:].clamp(min=0).sqrt()
    else:
        _, vecs = torch.linalg.eigh(centred.transpose(1, 2) @ centred)
        proj = torch.einsum("bpk,bk->bp", centred, vecs[:, :, -1])
    return oriented(proj, m).reshape(b, h, w)


def oriented(proj: Tensor, m: Tensor) -> Tensor:
    """Flip each projection (B, P) whose sign disagrees with the data (B, P, K): the result correlates
    positively with the channel sum of ``m`` over the P positions (kept as is when uncorrelated)."""
    ref = m.sum(dim=2)
    ref = ref - ref.mean(dim=1, keepdim=True)
    sign = torch.sign((proj * ref).sum(dim=1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return proj * sign[:, None]
