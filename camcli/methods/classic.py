"""CAM (from the classifier's weights), raw activation maps, and FEM (a statistic of the activations)."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from camcli.errors import UsageError
from camcli.methods.base import CamInputs, MethodOptions, MethodOutput, register, weigh


@register(
    "cam",
    needs_classifier=True,
    description="the original CAM: classifier weights of the class (GAP -> linear heads only)",
    paper="Zhou et al. 2016, Learning Deep Features for Discriminative Localization (arXiv:1512.04150)",
)
def cam(inputs: CamInputs) -> Tensor:
    w = inputs.classifier_weights
    return weigh(w[inputs.targets].to(inputs.activations.dtype), inputs.activations)


def parse_channels(spec: str, k: int) -> tuple[str, int]:
    """'mean' | 'N' (a channel index) | 'topN' -> (kind, number); UsageError otherwise."""
    s = spec.strip().lower()
    if s == "mean":
        return "mean", 0
    m = re.fullmatch(r"top(\d+)", s)
    if m and 1 <= int(m.group(1)) <= k:
        return "top", int(m.group(1))
    if re.fullmatch(r"\d+", s) and int(s) < k:
        return "index", int(s)
    raise UsageError(f"--channels {spec!r} is not valid for a layer of {k} channels (accepted: mean, 0..{k - 1}, top1..top{k})")


def _check_channels(options: MethodOptions, activations: Tensor) -> None:
    parse_channels(options.channels, activations.shape[1])


@register(
    "activations",
    check_layer=_check_channels,
    aliases=("activation", "act"),
    needs_target=False,
    description="the layer's raw activation: mean over channels, one channel, or the top N (with a grid)",
    paper="(no paper: the feature map itself)",
)
def activations(inputs: CamInputs) -> Tensor | MethodOutput:
    a = inputs.activations.float()
    kind, n = parse_channels(inputs.options.channels, a.shape[1])
    if kind == "mean":
        return a.mean(dim=1)
    if kind == "index":
        return a[:, n]
    ids = a.mean(dim=(2, 3)).topk(n, dim=1).indices  # strongest channels by mean activation
    chans = torch.gather(a, 1, ids[:, :, None, None].expand(-1, -1, *a.shape[2:]))
    return MethodOutput(cam=chans.mean(dim=1), channels=chans, channel_ids=ids)


FEM_K = 2.0  # the k of the k-sigma rule


@register(
    "fem",
    aliases=("feature-explanation",),
    needs_target=False,
    description="channel weight = share of its positions above mean + 2 std (class-agnostic)",
    paper="Fuad et al. 2020, Features Understanding in 3D CNNs for Actions Recognition in Video (IPTA 2020)",
)
def fem(inputs: CamInputs) -> Tensor:
    """w_k = share of positions where A_k > mean(A_k) + k std(A_k) (k = 2, population std); map
    sum_k w_k A_k. A channel matters by how often it fires unusually strongly.

    This is the definition camcli's issue #13 gives and pytorch-grad-cam implements. The paper (and
    xplique) weights each channel's binary mask by its mean instead: that is ``fem-paper``.
    """
    a = inputs.activations.float()
    mean = a.mean(dim=(2, 3), keepdim=True)
    std = a.std(dim=(2, 3), keepdim=True, correction=0)
    share = (a > mean + FEM_K * std).to(a.dtype).mean(dim=(2, 3))
    return weigh(share, a)


@register(
    "fem-paper",
    aliases=("fem-fuad",),
    needs_target=False,
    description="FEM as the paper defines it: each channel's k-sigma mask (A_k > mean + 2 std) weighted by "
    "the channel's mean activation (class-agnostic)",
    paper="Fuad et al. 2020, Features Understanding in 3D CNNs for Actions Recognition in Video (IPTA 2020)",
)
def fem_paper(inputs: CamInputs) -> Tensor:
    """Fuad et al.'s FEM: B_k = [A_k > mean(A_k) + k std(A_k)] (k = 2, population std), w_k =
    mean(A_k); map sum_k w_k B_k. A channel matters by how strongly it fires on average, and shows
    only where it fires unusually strongly. ``fem`` keeps pytorch-grad-cam's weighting."""
    a = inputs.activations.float()
    mean = a.mean(dim=(2, 3), keepdim=True)
    std = a.std(dim=(2, 3), keepdim=True, correction=0)
    mask = (a > mean + FEM_K * std).to(a.dtype)
    return weigh(mean[:, :, 0, 0], mask)
