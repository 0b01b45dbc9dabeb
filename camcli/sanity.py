"""Model-randomisation sanity check (Adebayo et al. 2018) and the rank correlation it reports."""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from torch import nn


def randomized_copy(model: nn.Module, modules: Sequence[str], seed: int = 0) -> nn.Module:
    """A deep copy with the named sub-modules (and everything inside them) re-initialised."""
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


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_ranks(a), _ranks(b))
