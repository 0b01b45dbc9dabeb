"""Model-randomisation sanity check (Adebayo et al. 2018) and the rank correlation it reports.

camcli re-initialises the network as the paper's cascade does, from the logits down to the target
layer, and reports the cascade's final step: every module that runs at or after the target layer
re-initialised (the target layer included). A faithful map must change: |Spearman rho| between the
trained model's map and the randomised one's near 0 passes, near 1 fails. The sign of rho is not
evidence (a re-initialised layer flips signs at random), so its absolute value is averaged over
SANITY_SEEDS re-initialisations, and its spread over them is reported.

The reference points follow the paper: a map that does not depend on the model (an edge detector
there, camcli's random and centre baselines here) is unchanged by the randomisation, rho = 1. A
method passes when its mean |rho| falls clearly below that: under SANITY_THRESHOLD (the randomised
model's map shares at most a quarter of its rank variance with the trained model's).

Each seed draws different weights, normalisation layers included: their own ``reset_parameters``
sets weight 1 and bias 0 whatever the seed, so a cascade that ends at a BatchNorm would re-initialise
the target layer the same way three times.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from camcli.layers import trace_layers

SANITY_SEEDS = 3  # re-initialisations per image; the metric is the mean |rho| over them
SANITY_THRESHOLD = 0.5  # a method passes when its mean |rho| is below this; model-independent maps score 1
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
NORM_WEIGHT_STD = 0.5  # a re-initialised normalisation layer: weight ~ N(1, 0.5), bias ~ N(0, 0.5)


def sanity_passes(mean_abs_rho: float | None) -> bool | None:
    """The verdict on a mean |rho|: True below SANITY_THRESHOLD, None when undefined."""
    return None if mean_abs_rho is None else mean_abs_rho < SANITY_THRESHOLD


def cascade(net: nn.Module, layer: str, example: torch.Tensor) -> list[str]:
    """The modules the cascade re-initialises, in its order: from the last to run (the logits) down
    to the target layer, which is included with everything inside it. Its ancestors are not: they
    contain the whole network below it."""
    infos = trace_layers(net, example)
    start = next(i.finished for i in infos if i.name == layer)
    ancestors = {layer.rsplit(".", k)[0] for k in range(1, layer.count(".") + 1)}
    above = [
        i for i in infos
        if i.finished >= start and i.name != layer and not i.name.startswith(layer + ".") and i.name not in ancestors
    ]
    return [i.name for i in sorted(above, key=lambda i: -i.finished)] + [layer]  # the layer: all inside it


def randomized_copy(model: nn.Module, modules: Sequence[str], seed: int = 0) -> nn.Module:
    """A deep copy with the named sub-modules (and everything inside them) re-initialised, in the
    order given (the cascade's: top first), from one seeded generator. Normalisation layers get
    seeded random affine parameters (weight ~ N(1, 0.5), bias ~ N(0, 0.5)) and fresh running
    statistics, so every seed gives a different model."""
    clone = copy.deepcopy(model)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name in modules:
            for sub in clone.get_submodule(name).modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()  # type: ignore[operator]
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    sub.reset_running_stats()
                if isinstance(sub, NORM_LAYERS):
                    with torch.no_grad():
                        if isinstance(getattr(sub, "weight", None), torch.Tensor):
                            sub.weight.normal_(1.0, NORM_WEIGHT_STD)
                        if isinstance(getattr(sub, "bias", None), torch.Tensor):
                            sub.bias.normal_(0.0, NORM_WEIGHT_STD)
    finally:
        torch.random.set_rng_state(gen_state)
    return clone


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    flat = x.ravel()
    order = flat.argsort(kind="mergesort")
    ranks = np.empty(flat.size, dtype=np.float64)
    ranks[order] = np.arange(flat.size, dtype=np.float64)
    _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    x = a.ravel().astype(np.float64) - a.mean()
    y = b.ravel().astype(np.float64) - b.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else 0.0


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation; None (undefined) when either map is constant, an empty map say."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return pearson(_ranks(a), _ranks(b))


@dataclass(frozen=True)
class SanityScore:
    """One map against its randomised counterparts: the metric is ``value`` (mean |rho|)."""

    rho: list[float | None]  # signed, one per re-initialisation; None where undefined
    value: float | None  # mean |rho| over the defined ones; None when none is defined
    spread: float | None  # standard deviation of |rho| over the defined ones
    note: str | None = None

    def record(self) -> dict[str, object]:
        rec: dict[str, object] = {
            "rho": [None if r is None else round(r, 6) for r in self.rho],
            "mean_abs_rho": None if self.value is None else round(self.value, 6),
            "spread": None if self.spread is None else round(self.spread, 6),
        }
        if self.note:
            rec["note"] = self.note
        return rec


def sanity_score(cam: np.ndarray, randomized: Sequence[np.ndarray | None]) -> SanityScore:
    """Compare a map with its maps from re-initialised models (None: that map came out empty)."""
    if np.ptp(cam) == 0:
        return SanityScore([None] * len(randomized), None, None,
                           "the map itself is empty or constant: the correlation is undefined")
    rho = [None if r is None else spearman(cam, r) for r in randomized]
    defined = [abs(r) for r in rho if r is not None]
    undefined = len(rho) - len(defined)
    note = None
    if undefined:
        note = (f"the randomised model's map is empty or constant for {undefined} of {len(rho)} "
                "re-initialisations: the correlation is undefined there" + ("" if defined else " (no value)"))
    if not defined:
        return SanityScore(rho, None, None, note)
    return SanityScore(rho, float(np.mean(defined)), float(np.std(defined)), note)
