"""CLIP-style models: the image tower is what camcli explains; text prompts are what it is compared with.

A Hugging Face ``CLIPModel`` folder (config.json with model_type "clip") loads as :class:`ClipImage`:
the vision tower and its projection as sub-modules (layer names as in ``CLIPModel``:
``vision_model.encoder.layers.N...``), the text tower kept aside, out of the module tree (no layer
of it is listed or hooked). Without prompts its output is the image embedding after the visual
projection (for ``--reference`` and ``--target``); after :meth:`ClipImage.set_prompts` (``--text``,
encoded once per run in ``Session.open``) it is CLIP's ``logits_per_image``: (batch, prompts) =
logit_scale * cos(image embedding, text embedding).

:class:`ClipStyle` is what every such wrapper shares (the output with or without prompts, prompts set
once); :class:`ClipImage` and ``camcli/models/openclip.py``'s ``OpenClipImage`` say how their image
is embedded and their prompts encoded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from camcli.errors import UsageError

# What a tokenizer saved beside the model is made of (save_pretrained of CLIPTokenizer or CLIPProcessor).
TOKENIZER_FILES = ("tokenizer.json", ("vocab.json", "merges.txt"))


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in ("vocab.json", "merges.txt"))


class ClipStyle(nn.Module, ABC):
    """An image tower whose output is compared with text prompts' embeddings once they are set.

    Subclasses register the image tower (and ``logit_scale``, a parameter holding log of the scale)
    as sub-modules, keep the text tower out of the module tree (no layer of it is listed or hooked),
    and say how an image is embedded (:meth:`image_embeds`) and prompts are encoded (:meth:`encode_text`).
    Without prompts the output is the image embedding; with them, (batch, prompts) logits:
    logit_scale.exp() * cos(image, text) (+ ``logit_bias`` where the model has one)."""

    logit_scale: nn.Parameter

    def __init__(self) -> None:
        super().__init__()
        self.prompts: tuple[str, ...] = ()
        self.register_buffer("text_embeds", None, persistent=False)  # (P, D) unit vectors, once set

    @abstractmethod
    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        """(B, D): the image embedding the model compares with text (before normalisation)."""

    @abstractmethod
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """(P, D) unit text embeddings of ``prompts``, in float32, on the device the model is on."""

    def forward(self, pixel_values: Tensor) -> Tensor:
        image = self.image_embeds(pixel_values)
        if self.text_embeds is None:
            return image
        image = image / image.norm(dim=-1, keepdim=True)
        logits = self.logit_scale.exp() * (image @ self.text_embeds.to(image.dtype).t())
        bias = getattr(self, "logit_bias", None)  # SigLIP-style models add one
        return logits if bias is None else logits + bias

    def set_prompts(self, prompts: Sequence[str]) -> None:
        """Compare images with ``prompts`` from now on (none: output the image embedding again)."""
        self.prompts = tuple(prompts)
        self.text_embeds = self.encode_text(self.prompts) if self.prompts else None


class ClipImage(ClipStyle):
    """A ``CLIPModel``'s image tower, its output compared with prompts' text embeddings once they are set.

    ``folder``: where the tokenizer is saved (a Hugging Face folder); or ``tokenizer`` itself (a
    ``--model module:function`` returning ``ClipImage(CLIPModel(...), tokenizer=...)``)."""

    def __init__(self, clip: nn.Module, folder: Path | None = None, tokenizer: Any = None) -> None:  # noqa: ANN401
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.logit_scale = clip.logit_scale
        # The vision config: its model_type (clip_vision_model), patch and image size give the token layout.
        self.config = clip.config.vision_config
        self.text_config = clip.config.text_config
        self.folder = folder
        self._tokenizer = tokenizer
        # The text tower, outside the module tree: used once per run by set_prompts, never hooked.
        object.__setattr__(self, "_text", (clip.text_model.eval(), clip.text_projection.eval()))

    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        """(B, D): the class token's pooled output after the visual projection, as CLIPModel's image_embeds."""
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)

    def tokenizer(self) -> Any:  # noqa: ANN401
        """The tokenizer saved in the model's folder; UsageError naming the files it lacks."""
        if self._tokenizer is not None:
            return self._tokenizer
        folder = self.folder
        if folder is None or not has_tokenizer(folder):
            where = "the model" if folder is None else f"the CLIP folder {str(folder)!r}"
            raise UsageError(
                f"--text needs a tokenizer and {where} has none: expected tokenizer.json, or vocab.json and "
                "merges.txt (saved by the CLIPTokenizer's or CLIPProcessor's save_pretrained into the same folder)"
            )
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError alike
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"--text: the tokenizer in {str(folder)!r} could not be read: {first}") from None

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """(P, D) unit text embeddings of ``prompts``: tokenized and run through the text tower once,
        on the device the model is on, in float32."""
        tokens = self.tokenizer()(list(prompts), padding=True, truncation=True, return_tensors="pt",
                                  max_length=int(self.text_config.max_position_embeddings))
        text_model, projection = self._text
        device = self.logit_scale.device
        text_model.to(device)
        projection.to(device)
        with torch.no_grad():
            pooled = text_model(input_ids=tokens["input_ids"].to(device),
                                attention_mask=tokens["attention_mask"].to(device)).pooler_output
            embeds = projection(pooled).float()
        return embeds / embeds.norm(dim=-1, keepdim=True)


def is_clip(module: nn.Module) -> bool:
    return isinstance(module, ClipStyle)
