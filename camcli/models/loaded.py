"""LoadedModel: a module plus everything needed to feed it and name its outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from camcli.images import Preprocess
    from camcli.layers import LayerTrace


@dataclass
class Probe:
    """The traced forward made at load time (two images at the model's size), kept so that opening a
    session need not run the model again: its input (seeded noise), the raw output, and the trace of
    every module (shapes, order, the outputs of the layers asked for and of the last spatial layer).
    ``Session.open`` takes it off the LoadedModel: it serves one session."""

    inputs: Tensor
    output: Any  # noqa: ANN401 - whatever the model returns
    trace: LayerTrace

    def seen(self, layers: list[str]) -> tuple[Tensor, Any, dict[str, Tensor]] | None:
        """(input, output, layer outputs) when the probe kept every one of ``layers`` as a tensor, else None."""
        kept = {name: self.trace.kept.get(name) for name in layers}
        if all(isinstance(t, Tensor) for t in kept.values()):
            return self.inputs, self.output, kept  # type: ignore[return-value]
        return None


@dataclass
class LoadedModel:
    name: str
    module: nn.Module
    source: str  # bundled | torchvision | timm | callable | file | torch.export | huggingface
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int  # the shorter side (flexible models) or the square side (fixed models)
    flexible_size: bool  # accepts any input size (global pooling)
    num_classes: int
    labels: list[str] | None = None
    weights: str | None = None  # file path, "bundled", "pretrained (cache)" or "random"
    weights_sha256: str | None = None
    task: str = "classification"  # or "segmentation": (B, classes, H, W) scores per pixel
    # A Hugging Face config's problem_type (multi_label_classification, regression, ...): what --activation auto reads
    problem_type: str | None = None
    # flexible models: input sides are rounded to a multiple of this (a transformer's patch grid stride)
    size_multiple: int = 1
    probe: Probe | None = field(default=None, repr=False, compare=False)

    def preprocess(self) -> Preprocess:
        """The preprocessing this model needs: size, mean/std, fixed or flexible, size multiple."""
        from camcli.images import Preprocess

        return Preprocess(self.input_size, self.mean, self.std, self.flexible_size, self.size_multiple)

    def label(self, index: int) -> str | None:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return None
