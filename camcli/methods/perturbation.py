"""Gradient-free methods that score masked or ablated inputs: Score-CAM, SS-CAM, IS-CAM, Ablation-CAM.

All model calls go through the engine's scorers, which run under ``torch.inference_mode`` with the
layer hooks passive, ``--perturbation-batch`` masked inputs per call.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from camcli.methods.base import CamInputs, chunks, draw_noise, noise_generator, register, rescaled, weigh


def channel_subset(a: Tensor, n: int | None) -> Tensor:
    """Indices of the ``n`` channels with the most activation mass (all channels when n is None)."""
    k = a.shape[0]
    if n is None or n >= k:
        return torch.arange(k, device=a.device)
    return a.flatten(1).clamp(min=0).sum(dim=1).topk(n).indices.sort().values


def upsampled_masks(a: Tensor, size: tuple[int, int]) -> Tensor:
    """(n, h, w) activations -> (n, H, W) masks: bilinear upsampling, then min-max per channel."""
    return rescaled(F.interpolate(a[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0])


def _score_family(
    inputs: CamInputs,
    method: str,
    channel_score: Callable[[Tensor, Tensor, int], Tensor],  # (x_one, masks, image_index)
    on_image: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Shared Score-CAM loop: per image, per chunk of channels, score masked inputs; softmax weights.

    ``channel_score(x_one (1,3,H,W), masks (n,H,W), image_index)`` -> (n,) scores. ``on_image(x_one)`` runs
    before each image (SS-CAM reseeds its noise there, so a map never depends on its batch).
    """
    a = inputs.activations
    x = inputs.inputs
    opts = inputs.options
    size = (x.shape[-2], x.shape[-1])
    weights = torch.zeros(a.shape[0], a.shape[1], device=a.device, dtype=torch.float32)
    for b in range(a.shape[0]):
        if on_image is not None:
            on_image(x[b : b + 1])
        chans = channel_subset(a[b], opts.score_channels)
        scores = torch.empty(len(chans), device=a.device)
        for start in chunks(len(chans), opts.perturbation_batch, f"{method} image {b + 1}", opts.progress):
            idx = chans[start : start + opts.perturbation_batch]
            masks = upsampled_masks(a[b, idx], size)
            scores[start : start + len(idx)] = channel_score(x[b : b + 1], masks, b)
        weights[b, chans] = torch.softmax(scores, dim=0)
    return weigh(weights, a.float())


@register(
    "scorecam",
    aliases=("score-cam",),
    needs_scorer=True,
    extra_forwards="K",
    description="softmax over the target scores of the input masked by each upsampled channel",
    paper="Wang et al. 2020, Score-CAM (arXiv:1910.01279)",
)
def scorecam(inputs: CamInputs) -> Tensor:
    scorer = inputs.scorer
    return _score_family(inputs, "scorecam", lambda x1, m, c: scorer(x1 * m[:, None], c))


@register(
    "ss-cam",
    aliases=("sscam", "smoothed-scorecam"),
    needs_scorer=True,
    extra_forwards="K x N",
    description="Score-CAM with each masked input's score averaged over N Gaussian-noise copies",
    paper="Wang et al. 2020, SS-CAM (arXiv:2006.14255)",
)
def sscam(inputs: CamInputs) -> Tensor:
    scorer = inputs.scorer
    opts = inputs.options
    gen = noise_generator(opts.seed)
    sigma: list[Tensor | float] = [0.0]

    def start(x1: Tensor) -> None:  # the same noise for an image whatever its batch
        gen.manual_seed(opts.seed)
        sigma[0] = opts.noise * (x1.max() - x1.min())  # stays a device scalar: no wait

    def score(x1: Tensor, masks: Tensor, c: int) -> Tensor:
        masked = x1 * masks[:, None]
        total = torch.zeros(masks.shape[0], device=x1.device)
        for _ in range(opts.samples):
            noise = draw_noise([gen], masked.shape, x1.device)[0] * sigma[0]
            total += scorer(masked + noise, c)
        return total / opts.samples

    return _score_family(inputs, "ss-cam", score, on_image=start)


@register(
    "is-cam",
    aliases=("iscam", "integrated-scorecam"),
    needs_scorer=True,
    extra_forwards="K x N",
    description="Score-CAM with scores integrated over masks scaled i/N, i = 1..N",
    paper="Naidu et al. 2020, IS-CAM (arXiv:2010.03023)",
)
def iscam(inputs: CamInputs) -> Tensor:
    scorer = inputs.scorer
    n = inputs.options.samples

    def score(x1: Tensor, masks: Tensor, c: int) -> Tensor:
        total = torch.zeros(masks.shape[0], device=x1.device)
        for i in range(1, n + 1):
            total += scorer(x1 * (masks * (i / n))[:, None], c)
        return total / n

    return _score_family(inputs, "is-cam", score)


@register(
    "ablationcam",
    aliases=("ablation-cam",),
    needs_layer_scorer=True,
    extra_forwards="K",
    description="weight = drop of the target score when the channel is zeroed, divided by |score|",
    paper="Desai & Ramaswamy 2020, Ablation-CAM (WACV 2020)",
)
def ablationcam(inputs: CamInputs) -> Tensor:
    """w_k = (y - y_k) / |y|, y the target score and y_k the score with channel k zeroed.

    The paper divides by y itself (pytorch-grad-cam too). When the target logit is negative that
    flips every weight, and the map shows what argues *against* the class; |y| keeps the meaning
    of the sign: a channel whose removal lowers the score supports the class.
    """
    score_with = inputs.layer_scorer
    a = inputs.activations
    opts = inputs.options
    b_, k = a.shape[:2]
    weights = torch.zeros(b_, k, device=a.device, dtype=torch.float32)
    for b in range(b_):
        base = score_with(b, a[b : b + 1])[0]  # a device scalar: no wait per image
        divisor = torch.where(base != 0, base.abs(), torch.ones_like(base))
        chans = channel_subset(a[b], opts.score_channels)
        for start in chunks(len(chans), opts.perturbation_batch, f"ablationcam image {b + 1}", opts.progress):
            idx = chans[start : start + opts.perturbation_batch]
            ablated = a[b : b + 1].repeat(len(idx), 1, 1, 1)
            ablated[torch.arange(len(idx)), idx] = 0
            weights[b, idx] = (base - score_with(b, ablated)) / divisor
    return weigh(weights, a.float())
