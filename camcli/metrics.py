"""Faithfulness and localisation metrics, as pure functions of an image, a map and a score function.

Conventions (the choices the papers leave open are written here and in the README):
- ``x`` is a preprocessed (3, H, W) input; ``cam`` a (H, W) map at the same resolution, >= 0.
- ``prob`` maps a batch (N, 3, H, W) to the (N,) probability of the target class (under the
  session's ``--activation``: softmax, sigmoid, or the raw output with none).
- Pixels are ranked by the map, highest first; ties keep raster order (stable sort).
- Curves have ``steps + 1`` points at fractions 0, 1/steps, ..., 1; AUC is the trapezoid rule on [0, 1].
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from camcli.activation import probabilities
from camcli.options import Activation

ProbFn = Callable[[Tensor], Tensor]

BLUR_KERNEL = 11  # insertion starts from a Gaussian blur, kernel 11, sigma 5 (as in RISE's code)
BLUR_SIGMA = 5.0
ROAD_PERCENTAGES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ROAD_NOISE = 0.01  # std of the noise added to imputed pixels, in [0, 1] pixel units


def ranking(cam: Tensor) -> Tensor:
    """Flat pixel indices, most relevant first (stable for ties)."""
    return torch.sort(cam.flatten(), descending=True, stable=True).indices


Inputs = tuple[int, Callable[[int], Tensor]]  # how many perturbed images a metric needs, and the i-th


def _batched(prob: ProbFn, images: Callable[[int], Tensor], n: int, batch: int) -> Tensor:
    out = []
    for start in range(0, n, batch):
        idx = range(start, min(n, start + batch))
        out.append(prob(torch.stack([images(i) for i in idx])).float().cpu())
    return torch.cat(out)


def _counts(total: int, steps: int) -> list[int]:
    return [round(total * i / steps) for i in range(steps + 1)]


def replacement_inputs(base: Tensor, source: Tensor, cam: Tensor, steps: int) -> Inputs:
    """The ``steps + 1`` images in which the top-ranked pixels of ``base`` are replaced, step by step,
    by ``source``'s."""
    c, h, w = base.shape
    order = ranking(cam)
    counts = _counts(h * w, steps)
    flat_base = base.reshape(c, -1)
    flat_source = source.reshape(c, -1)

    def image(i: int) -> Tensor:
        out = flat_base.clone()
        idx = order[: counts[i]]
        out[:, idx] = flat_source[:, idx]
        return out.reshape(c, h, w)

    return steps + 1, image


def deletion_inputs(x: Tensor, cam: Tensor, steps: int = 100, fill: Tensor | None = None) -> Inputs:
    """The deletion curve's images: the most relevant pixels replaced by the image's mean colour."""
    fill = x.mean(dim=(1, 2), keepdim=True) if fill is None else fill
    return replacement_inputs(x, fill.expand_as(x), cam, steps)


def insertion_inputs(x: Tensor, cam: Tensor, steps: int = 100, start: Tensor | None = None) -> Inputs:
    """The insertion curve's images: the most relevant pixels put back into a blurred copy."""
    return replacement_inputs(blurred(x) if start is None else start, x, cam, steps)


def deletion_curve(x: Tensor, cam: Tensor, prob: ProbFn, steps: int = 100, batch: int = 16,
                   fill: Tensor | None = None) -> Tensor:
    """Target probability as the most relevant pixels are replaced by the image's mean colour."""
    n, image = deletion_inputs(x, cam, steps, fill)
    return _batched(prob, image, n, batch)


def blurred(x: Tensor) -> Tensor:
    """Gaussian blur (kernel 11, sigma 5; the kernel shrinks on images smaller than 12 pixels)."""
    from torchvision.transforms.functional import gaussian_blur

    k = min(BLUR_KERNEL, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)
    if k < 3:
        return x.clone()
    return gaussian_blur(x[None], [k, k], [BLUR_SIGMA, BLUR_SIGMA])[0]


def insertion_curve(x: Tensor, cam: Tensor, prob: ProbFn, steps: int = 100, batch: int = 16,
                    start: Tensor | None = None) -> Tensor:
    """Target probability as the most relevant pixels are put back into a blurred copy."""
    n, image = insertion_inputs(x, cam, steps, start)
    return _batched(prob, image, n, batch)


def auc(curve: Tensor) -> float:
    """Area under a curve sampled at evenly spaced fractions of [0, 1] (trapezoid rule)."""
    y = curve.double()
    n = y.numel() - 1
    return float(((y[1:] + y[:-1]) / 2).sum() / n)


def explanation_image(x: Tensor, cam: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """E = map * image in pixel space (Grad-CAM++ paper), returned normalised like ``x``."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    pixels = x * s + m
    return (pixels * cam[None] - m) / s


def average_drop(y: float, o: float) -> float:
    """max(0, Y - O) / Y, in percent: how much confidence the explanation image alone loses."""
    return 100.0 * max(0.0, y - o) / y if y > 0 else 0.0


def increase_in_confidence(y: float, o: float) -> float:
    """100 when the explanation image alone is more confident than the whole image, else 0."""
    return 100.0 if o > y else 0.0


def complexity(cam: Tensor) -> float:
    """Mean map value: an all-ones map scores 1 and wins nothing by it."""
    return float(cam.float().mean())


_NEIGHBOURS = [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)]


def noisy_linear_impute(pixels: np.ndarray, removed: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """ROAD's noisy linear imputation: each removed pixel equals the weighted mean of its 8
    neighbours (weights 1/6 direct, 1/12 diagonal), solved as one sparse linear system; then
    Gaussian noise of std ``noise`` is added to the imputed pixels. ``pixels``: (C, H, W)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    c, h, w = pixels.shape
    unknown = np.flatnonzero(removed.ravel())
    if unknown.size == 0:
        return pixels.copy()
    index = -np.ones(h * w, dtype=np.int64)
    index[unknown] = np.arange(unknown.size)
    ys, xs = np.divmod(unknown, w)
    flat = pixels.reshape(c, -1).astype(np.float64)
    rows, cols, vals = [], [], []
    diag = np.zeros(unknown.size)
    rhs = np.zeros((unknown.size, c))
    for dy, dx, wt in _NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        p = np.flatnonzero(ok)
        q = ny[ok] * w + nx[ok]
        diag[p] += wt
        qi = index[q]
        unk = qi >= 0
        rows.append(p[unk])
        cols.append(qi[unk])
        vals.append(np.full(int(unk.sum()), -wt))
        np.add.at(rhs, p[~unk], wt * flat[:, q[~unk]].T)
    rows.append(np.arange(unknown.size))
    cols.append(np.arange(unknown.size))
    vals.append(diag)
    a = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(unknown.size, unknown.size)).tocsc()
    solved = spsolve(a, rhs).reshape(unknown.size, c)
    out = flat.copy()
    out[:, unknown] = solved.T + rng.normal(0.0, noise, size=(c, unknown.size)) if noise > 0 else solved.T
    return out.reshape(c, h, w).astype(pixels.dtype)


def road_inputs(x: Tensor, cam: Tensor, mean: Sequence[float], std: Sequence[float], *,
                percentages: Sequence[int] = ROAD_PERCENTAGES, noise: float = ROAD_NOISE, seed: int = 0) -> Inputs:
    """ROAD's imputed images: the p% most (MoRF), then least (LeRF) relevant pixels removed, per p.

    Each image is imputed when it is asked for; they must be asked for in order (the noise is one
    seeded stream, as when they were made all at once).
    """
    c, h, w = x.shape
    m = np.asarray(mean, dtype=np.float64).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float64).reshape(3, 1, 1)
    pixels = x.detach().cpu().double().numpy() * s + m
    order = ranking(cam).cpu().numpy()
    rng = np.random.default_rng(seed)
    plan = [(most, p) for most in (True, False) for p in percentages]
    made = [0]

    def image(i: int) -> Tensor:
        if i != made[0]:
            raise RuntimeError(f"ROAD images are made in order: asked for {i}, next is {made[0]}")
        made[0] += 1
        most, p = plan[i]
        k = round(h * w * p / 100)
        idx = order[:k] if most else order[::-1][:k]
        removed = np.zeros(h * w, bool)
        removed[idx] = True
        imputed = noisy_linear_impute(pixels, removed.reshape(h, w), noise, rng)
        return torch.from_numpy(((imputed - m) / s).astype(np.float32)).to(x.device)

    return len(plan), image


def road_scores(probs: Tensor, percentages: int) -> tuple[float, float, float]:
    """(MoRF, LeRF, combined) from the probabilities of road_inputs' images."""
    morf, lerf = float(probs[:percentages].mean()), float(probs[percentages:].mean())
    return morf, lerf, (lerf - morf) / 2


def road(x: Tensor, cam: Tensor, prob: ProbFn, mean: Sequence[float], std: Sequence[float], *,
         percentages: Sequence[int] = ROAD_PERCENTAGES, noise: float = ROAD_NOISE, seed: int = 0,
         batch: int = 16) -> tuple[float, float, float]:
    """(MoRF, LeRF, combined): mean target probability after imputing the p% most (MoRF) or least
    (LeRF) relevant pixels, over the percentages; combined = (LeRF - MoRF) / 2."""
    n, image = road_inputs(x, cam, mean, std, percentages=percentages, noise=noise, seed=seed)
    return road_scores(_batched(prob, image, n, batch), len(percentages))


def target_probability(logits: Tensor, classes: Tensor, activation: Activation | None = Activation.SOFTMAX) -> Tensor:
    """(N,) probability of class ``classes[i]`` in row i of (N, classes) logits under ``activation``
    (softmax, sigmoid, or none: the raw output): what every curve, Average Drop and ROAD score reads
    (the one place that turns evaluate's logits into probabilities)."""
    return probabilities(logits, activation).gather(1, classes.to(logits.device)[:, None])[:, 0]


class Job:
    """One metric's perturbed inputs for one image: filled with target probabilities by a Batcher."""

    def __init__(self, n: int, image: Callable[[int], Tensor], target: int, shape: tuple[int, ...]) -> None:
        self.n, self.image, self.target, self.shape = n, image, target, shape
        self.probs = np.zeros(n, dtype=np.float32)

    @property
    def result(self) -> Tensor:
        """(n,) float32 probabilities, in the order of the inputs."""
        return torch.from_numpy(self.probs)


class Batcher:
    """Scores the perturbed inputs of many images and metrics, ``batch`` to a forward pass.

    A deletion curve's 101 images, the next curve's and the next image's fill the same forward
    passes (inputs of one shape together; other shapes get their own). Inputs are made lazily, in
    order, one batch at a time, so memory holds a batch, not a curve; each batch comes back to the
    host in one copy. ``logits`` maps a batch (N, 3, H, W) to (N, classes) logits, read through
    ``activation`` (the session's, resolved); or, with ``scalar`` (a --reference, --target or
    one-prompt --text run), to the model output that ``scalar`` turns into one value per input.
    """

    def __init__(self, logits: Callable[[Tensor], Tensor], batch: int,
                 on_batch: Callable[[int], None] | None = None,
                 activation: Activation | None = Activation.SOFTMAX,
                 scalar: Callable[[Tensor], Tensor] | None = None) -> None:
        self.logits = logits
        self.activation = activation
        self.scalar = scalar
        self.batch = max(1, batch)
        self.on_batch = on_batch
        self.jobs: list[Job] = []

    def add(self, inputs: Inputs, target: int, like: Tensor) -> Job:
        """Queue ``inputs`` (n, image(i)) scored for class ``target``; ``like``: an input of their shape."""
        job = Job(inputs[0], inputs[1], target, tuple(like.shape))
        self.jobs.append(job)
        return job

    def run(self) -> None:
        shapes: dict[tuple[int, ...], list[Job]] = {}
        for job in self.jobs:
            shapes.setdefault(job.shape, []).append(job)
        self.jobs = []
        for jobs in shapes.values():
            items = [(job, i) for job in jobs for i in range(job.n)]
            for start in range(0, len(items), self.batch):
                chunk = items[start : start + self.batch]
                x = torch.stack([job.image(i) for job, i in chunk])
                classes = torch.tensor([job.target for job, _ in chunk], device=x.device)
                out = self.logits(x)
                scored = self.scalar(out) if self.scalar is not None else target_probability(out, classes, self.activation)
                values = scored.float().cpu().numpy()
                for (job, i), v in zip(chunk, values):
                    job.probs[i] = v
                if self.on_batch is not None:
                    self.on_batch(len(chunk))


def _box_mask(shape: tuple[int, int], boxes: Sequence[Sequence[float]]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        mask[int(round(y0)) : int(round(y1)), int(round(x0)) : int(round(x1))] = True
    return mask


def energy_pointing_game(cam: np.ndarray, boxes: Sequence[Sequence[float]]) -> float:
    """Share of the map's energy inside the boxes (Score-CAM paper)."""
    pos = np.clip(cam, 0, None)
    total = float(pos.sum())
    return float(pos[_box_mask(cam.shape, boxes)].sum() / total) if total > 0 else 0.0


def pointing_game(cam: np.ndarray, boxes: Sequence[Sequence[float]]) -> float:
    """1 when the map's peak lies inside a box, else 0 (averaged over images: the hit rate)."""
    if float(cam.max()) <= 0:
        return 0.0
    py, px = np.unravel_index(int(cam.argmax()), cam.shape)
    return 1.0 if _box_mask(cam.shape, boxes)[py, px] else 0.0


def random_map(h: int, w: int, seed: int, grid: tuple[int, int] | None = None) -> Tensor:
    """baseline:random: uniform noise on ``grid`` (the methods' feature-map resolution, so it is as
    coarse as a real CAM; default 1/32 of the image), upsampled bilinearly like the maps are."""
    g = torch.Generator().manual_seed(seed)
    gh, gw = grid if grid is not None else (max(1, h // 32), max(1, w // 32))
    small = torch.rand(1, 1, gh, gw, generator=g)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0, 0]


def center_map(h: int, w: int) -> Tensor:
    """baseline:center: a Gaussian centred on the image, sigma = 1/4 of each side."""
    ys = (torch.arange(h, dtype=torch.float32) - (h - 1) / 2) / (h / 4)
    xs = (torch.arange(w, dtype=torch.float32) - (w - 1) / 2) / (w / 4)
    return torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
