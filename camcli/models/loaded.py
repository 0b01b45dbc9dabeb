"""LoadedModel: a module plus everything needed to feed it and name its outputs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class LoadedModel:
    name: str
    module: nn.Module
    source: str  # bundled | torchvision | timm | callable
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int  # the shorter side (flexible models) or the square side (fixed models)
    flexible_size: bool  # accepts any input size (global pooling)
    num_classes: int
    labels: list[str] | None = None
    weights: str | None = None  # file path, "bundled", "pretrained (cache)" or "random"
    weights_sha256: str | None = None
    task: str = "classification"  # or "segmentation": (B, classes, H, W) scores per pixel

    def label(self, index: int) -> str | None:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return None
