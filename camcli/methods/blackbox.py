"""Black-box methods: occlusion and RISE. They read nothing of the model but the target's score of
perturbed inputs, so they work on any model the engine can run forward.

Both build their perturbed inputs in the preprocessed (normalised) input space and score them
through the engine's scorer (``torch.inference_mode``, layer taps paused), ``--perturbation-batch``
inputs per model call. Their maps are at the input's resolution (``pixel_space``): the chosen layer
plays no part.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from camcli.errors import UsageError
from camcli.methods.base import CamInputs, MethodOptions, chunks, noise_generator, register


# -- occlusion ----------------------------------------------------------------------------------
def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of a window sliding along one side, as captum's ``Occlusion``: k * stride for
    k = 0 .. ceil((size - window) / stride); the last window may run past the edge and is cut there.
    A window larger than the side is the whole side (one start)."""
    window = min(window, size)
    return [k * stride for k in range(math.ceil((size - window) / stride) + 1)]


def occlusion_masks(size: tuple[int, int], window: int, stride: int, device: torch.device | str) -> Tensor:
    """(P, H, W) float masks, 1 inside each window position (rows outer, columns inner), cut at the edges."""
    h, w = size
    wh, ww = min(window, h), min(window, w)
    ys, xs = window_starts(h, window, stride), window_starts(w, window, stride)
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    y0 = torch.tensor(ys, device=device)
    x0 = torch.tensor(xs, device=device)
    in_rows = (rows[None, :] >= y0[:, None]) & (rows[None, :] < y0[:, None] + wh)  # (Py, H)
    in_cols = (cols[None, :] >= x0[:, None]) & (cols[None, :] < x0[:, None] + ww)  # (Px, W)
    return (in_rows[:, None, :, None] & in_cols[None, :, None, :]).flatten(0, 1).float()


def _check_occlusion(options: MethodOptions, activations: Tensor) -> None:
    if options.occlusion_stride > options.occlusion_window:
        raise UsageError(
            f"--occlusion-stride {options.occlusion_stride} is larger than --occlusion-window "
            f"{options.occlusion_window}: pixels between the windows would never be occluded "
            "(accepted: a stride at most the window)"
        )


@register(
    "occlusion",
    aliases=("occ",),
    needs_scorer=True,
    pixel_space=True,
    check_layer=_check_occlusion,
    reads=("occlusion_window", "occlusion_stride", "occlusion_fill"),
    extra_forwards="P + 1 (P window positions)",
    description="mean drop of the target score over the sliding windows (--occlusion-window, --occlusion-stride) "
    "that cover each pixel, each window filled with --occlusion-fill; black-box, ignores --layer",
    paper="Zeiler & Fergus 2014, Visualizing and Understanding Convolutional Networks (arXiv:1311.2901)",
)
def occlusion(inputs: CamInputs) -> Tensor:
    """map(p) = mean over the windows W covering p of (y(x) - y(x with W filled)), as captum's
    ``Occlusion`` with a window over every colour channel and a scalar baseline."""
    scorer = inputs.scorer
    x = inputs.inputs
    opts = inputs.options
    b_, _, h, w = x.shape
    masks = occlusion_masks((h, w), opts.occlusion_window, opts.occlusion_stride, x.device)
    counts = masks.sum(dim=0)  # >= 1 everywhere: the stride is at most the window
    total = torch.zeros(b_, h, w, device=x.device, dtype=torch.float32)
    fill = torch.tensor(opts.occlusion_fill, device=x.device, dtype=x.dtype)
    for b in range(b_):
        x1 = x[b : b + 1]
        base = scorer(x1, b)[0]  # a device scalar: no wait per image
        for start in chunks(len(masks), opts.perturbation_batch, f"occlusion image {b + 1}", opts.progress):
            m = masks[start : start + opts.perturbation_batch]
            keep = (1 - m)[:, None].to(x.dtype)
            occluded = x1 * keep + fill * (1 - keep)
            drop = base - scorer(occluded, b)
            total[b] += torch.tensordot(drop, m, dims=1)
    return total / counts


# -- RISE ---------------------------------------------------------------------------------------
def rise_draws(n: int, grid: int, keep: float, size: tuple[int, int], seed: int) -> tuple[Tensor, Tensor]:
    """The random part of RISE's masks, drawn on the CPU from ``seed`` (the same on every device and
    for every image): (n, grid, grid) binary cells, 1 with probability ``keep``, then (n, 2) shifts
    (row, column) in [0, cell) with cell = ceil(side / grid)."""
    gen = noise_generator(seed)
    cells = (torch.rand((n, grid, grid), generator=gen) < keep).float()
    ch, cw = (math.ceil(s / grid) for s in size)
    dy = torch.randint(0, ch, (n,), generator=gen)
    dx = torch.randint(0, cw, (n,), generator=gen)
    return cells, torch.stack([dy, dx], dim=1)


def rise_masks(cells: Tensor, shifts: Tensor, size: tuple[int, int]) -> Tensor:
    """(n, s, s) cells and (n, 2) shifts -> (n, H, W) masks, as the paper's code: each grid upsampled
    bilinearly to (s + 1) * cell per side, then cropped to H x W at its shift. (The paper's code
    resizes with scikit-image's reflect mode; here the edge values are held, as torch's bilinear does.)"""
    n, s, _ = cells.shape
    h, w = size
    ch, cw = math.ceil(h / s), math.ceil(w / s)
    up = F.interpolate(cells[:, None].float(), size=((s + 1) * ch, (s + 1) * cw), mode="bilinear",
                       align_corners=False)[:, 0]
    rows = shifts[:, 0:1] + torch.arange(h, device=cells.device)[None]  # (n, H)
    cols = shifts[:, 1:2] + torch.arange(w, device=cells.device)[None]  # (n, W)
    return up[torch.arange(n, device=cells.device)[:, None, None], rows[:, :, None], cols[:, None, :]]


@register(
    "rise",
    needs_scorer=True,
    reads=("rise_masks", "rise_grid", "rise_keep"),
    pixel_space=True,
    extra_forwards="N (--rise-masks)",
    description="sum over N random masks M_i (--rise-grid cells kept with probability --rise-keep, upsampled and "
    "shifted) of (y(x * M_i) - mean y) * M_i / (N p); seeded by --seed; black-box, ignores --layer",
    paper="Petsiuk et al. 2018, RISE: Randomized Input Sampling for Explanation (arXiv:1806.07421)",
)
def rise(inputs: CamInputs) -> Tensor:
    """The paper's saliency sum_i y(x * M_i) M_i / (N p), with the mean score over the masks taken
    from every score first: sum_i (y_i - mean y) M_i / (N p).

    The paper explains a softmax probability, which is positive. camcli's default target is a logit,
    and `not:K` negates it: the paper's sum then carries a uniform offset, mean y * sum_i M_i / (N p),
    which can be negative everywhere and leave nothing after the ReLU. Taking the mean out removes
    that offset (the same map up to a constant where the sum of the masks is even, and less noise
    otherwise): what remains is how much keeping each pixel raises the score above its average, and
    the ReLU keeps the pixels that raise it, as occlusion's map keeps the pixels whose loss lowers it.
    """
    scorer = inputs.scorer
    x = inputs.inputs
    opts = inputs.options
    b_, _, h, w = x.shape
    n = opts.rise_masks
    cells, shifts = rise_draws(n, opts.rise_grid, opts.rise_keep, (h, w), opts.seed)
    cells, shifts = cells.to(x.device), shifts.to(x.device)
    weighted = torch.zeros(b_, h, w, device=x.device, dtype=torch.float32)  # sum_i y_i M_i
    score_sum = torch.zeros(b_, device=x.device, dtype=torch.float32)  # sum_i y_i
    mask_sum = torch.zeros(h, w, device=x.device, dtype=torch.float32)  # sum_i M_i
    for start in chunks(n, opts.perturbation_batch, "rise", opts.progress):
        end = min(start + opts.perturbation_batch, n)
        m = rise_masks(cells[start:end], shifts[start:end], (h, w))
        mask_sum += m.sum(dim=0)
        for b in range(b_):
            y = scorer(x[b : b + 1] * m[:, None].to(x.dtype), b)
            weighted[b] += torch.tensordot(y, m, dims=1)
            score_sum[b] += y.sum()
    mean = score_sum / n
    return (weighted - mean[:, None, None] * mask_sum) / (n * opts.rise_keep)
