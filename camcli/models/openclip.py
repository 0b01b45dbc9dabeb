"""open_clip models (the ``open_clip_torch`` package, an optional extra: ``pip install 'camcli[openclip]'``).

A local folder in open_clip's hub layout loads as :class:`OpenClipImage`, a CLIP-style model
(``camcli/models/clip.py``'s :class:`ClipStyle`): ``open_clip_config.json`` (``model_cfg``: the
architecture, ``preprocess_cfg``: mean, std, size) and ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin`` (read with ``weights_only=True``). The model is built from the json
alone and nothing is downloaded: a config that needs the network (a Hugging Face text tower or
tokenizer) is a UsageError. ``--model module:function`` returning an open_clip ``CLIP`` is wrapped the
same way (the default tokenizer, mean/std from ``visual.preprocess_cfg`` or OpenAI's).

The image tower is the wrapper's one sub-module, ``visual`` (layer names ``visual.transformer.resblocks.N...``
for a ViT, ``visual.trunk...`` for a timm tower, ``visual.layer4`` for ModifiedResNet); the text tower
stays out of the module tree. open_clip is imported only when such a model is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from camcli.errors import ModelError, UsageError
from camcli.layouts import ModelHints, model_hints
from camcli.models.clip import ClipStyle

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults where preprocess_cfg says nothing
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INSTALL = "pip install 'camcli[openclip]'"


def is_open_clip_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def import_open_clip(what: str) -> Any:  # noqa: ANN401
    """The ``open_clip`` package; a UsageError saying how to install it where it is missing."""
    try:
        import open_clip
    except ImportError:
        raise UsageError(f"{what} is an open_clip model; reading it needs the open_clip_torch package: {INSTALL}") from None
    return open_clip


def is_open_clip_model(module: object) -> bool:
    """Whether ``module`` is an open_clip CLIP (only if open_clip was imported: it is never imported here)."""
    import sys

    oc = sys.modules.get("open_clip")
    return oc is not None and isinstance(module, (oc.CLIP, oc.CustomTextCLIP))


class OpenClipImage(ClipStyle):
    """An open_clip ``CLIP``'s image tower (``visual``), compared with prompts' text embeddings once set.

    ``tokenizer``: called with a list of prompts, returns (P, context_length) token ids (open_clip's
    ``SimpleTokenizer``). ``mean``/``std``/``image_size``: the preprocessing the model was trained with
    (read by ``load.module_meta``)."""

    def __init__(self, clip: nn.Module, tokenizer: Any, mean: Sequence[float] = OPENAI_MEAN,  # noqa: ANN401
                 std: Sequence[float] = OPENAI_STD) -> None:
        super().__init__()
        _batch_first(clip.visual)
        self.visual = clip.visual
        self.logit_scale = clip.logit_scale
        if getattr(clip, "logit_bias", None) is not None:
            self.logit_bias = clip.logit_bias
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        size = getattr(clip.visual, "image_size", None)
        size = size if isinstance(size, int) else (size[0] if isinstance(size, (tuple, list)) and size else None)
        if isinstance(size, int) and size > 0:
            self.image_size = size
        self._tokenizer = tokenizer
        # The whole model, outside the module tree: its text tower is used once per run by set_prompts.
        object.__setattr__(self, "_clip", clip.eval())

    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        """(B, D): open_clip's ``encode_image`` before normalisation (the visual tower's projected output)."""
        return self.visual(pixel_values)

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """(P, D) unit text embeddings: open_clip's ``encode_text``, once, on the model's device, in float32."""
        clip = self._clip
        device = self.logit_scale.device
        clip.to(device)
        tokens = self._tokenizer(list(prompts)).to(device)
        with torch.no_grad():
            embeds = clip.encode_text(tokens).float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def token_hints(self) -> ModelHints:
        """Token layout facts for ``camcli/layouts.py``: a ViT tower's blocks are (B, 1 + h*w, D), the
        class token first (made batch-first here); a timm tower speaks for itself; a ResNet is a CNN."""
        visual = self.visual
        trunk = getattr(visual, "trunk", None)
        if isinstance(trunk, nn.Module):
            return model_hints(trunk)
        patch = getattr(visual, "patch_size", None)
        if patch is None or not hasattr(visual, "transformer"):
            return ModelHints()
        prefix = 1 if getattr(visual, "class_embedding", None) is not None else 0
        a, b = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
        return ModelHints(prefix, (a, b), False, "vit" if prefix else "swin", f"open_clip {type(visual).__name__}")


def _batch_first(visual: nn.Module) -> None:
    """Run a ViT tower's blocks on (B, L, D) tokens: a tower built with ``batch_first=False`` gives its
    blocks (L, B, D), whose first axis is not the batch (no layer of it could be explained). The same
    arithmetic either way: the blocks' attention reads its own ``batch_first``."""
    transformer = getattr(visual, "transformer", None)
    if transformer is None or getattr(transformer, "batch_first", True):
        return
    transformer.batch_first = True
    for block in getattr(transformer, "resblocks", ()):
        attn = getattr(block, "attn", None)
        if isinstance(attn, nn.MultiheadAttention):
            attn.batch_first = True


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{str(path)!r} is not readable JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise ModelError(f"{str(path)!r} has no model_cfg object (open_clip's hub layout: model_cfg and preprocess_cfg)")
    return data


def _tokenizer(open_clip: Any, text_cfg: dict[str, Any], where: str) -> Any:  # noqa: ANN401
    """open_clip's default SimpleTokenizer (its BPE vocabulary ships in the package); a Hugging Face
    tokenizer would need a download: UsageError."""
    if text_cfg.get("hf_tokenizer_name"):
        raise UsageError(
            f"--model {where}: its tokenizer is the Hugging Face tokenizer {text_cfg['hf_tokenizer_name']!r}, which "
            "camcli would have to download; accepted: open_clip models with the default tokenizer (no hf_tokenizer_name)"
        )
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    return open_clip.tokenizer.SimpleTokenizer(context_length=int(text_cfg.get("context_length", 77)), **kwargs)


def _build(open_clip: Any, model_cfg: dict[str, Any], where: str) -> nn.Module:  # noqa: ANN401
    cfg = dict(model_cfg)
    text_cfg, vision_cfg = dict(cfg.get("text_cfg") or {}), dict(cfg.get("vision_cfg") or {})
    if text_cfg.get("hf_model_name"):
        raise UsageError(
            f"--model {where}: its text tower is the Hugging Face model {text_cfg['hf_model_name']!r}, whose config "
            "camcli would have to download; accepted: open_clip models with their own text transformer"
        )
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False  # the folder's weights, never timm's download
    cfg["vision_cfg"], cfg["text_cfg"] = vision_cfg, text_cfg
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    try:
        return cls(**cfg)
    except Exception as e:  # noqa: BLE001 - an unknown key or a bad value: say which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"--model {where}: open_clip could not build model_cfg ({type(e).__name__}: {first})") from None


def _preprocess(preprocess_cfg: Any) -> dict[str, Any]:  # noqa: ANN401
    out: dict[str, Any] = {}
    if not isinstance(preprocess_cfg, dict):
        return out
    for key in ("mean", "std"):
        v = preprocess_cfg.get(key)
        if isinstance(v, (list, tuple)) and len(v) == 3:
            out[key] = tuple(float(x) for x in v)
    size = preprocess_cfg.get("size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, int) and size > 0:
        out["size"] = size
    return out


@dataclass
class Folder:
    """What an open_clip hub-layout folder holds, read without its weights (``load.py`` loads them
    into ``clip`` before :meth:`wrap` )."""

    clip: nn.Module
    tokenizer: Any
    weight_file: Path
    preprocess: dict[str, Any]

    def wrap(self) -> OpenClipImage:
        pre = self.preprocess
        return OpenClipImage(self.clip, self.tokenizer, pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD))


def read_folder(folder: Path) -> Folder:
    """The model built from ``open_clip_config.json`` (random weights, nothing downloaded), its
    tokenizer, weights file and preprocessing; UsageError for what camcli cannot read offline."""
    where = repr(str(folder))
    data = _read_config(folder)
    weight_file = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weight_file is None:
        raise UsageError(f"--model {where} has {CONFIG_FILE} but no weights: expected {' or '.join(WEIGHT_FILES)}")
    open_clip = import_open_clip(f"--model {where}")
    model_cfg = data["model_cfg"]
    tokenizer = _tokenizer(open_clip, dict(model_cfg.get("text_cfg") or {}), where)
    return Folder(_build(open_clip, model_cfg, where), tokenizer, weight_file, _preprocess(data.get("preprocess_cfg")))


def wrap_model(clip: nn.Module) -> OpenClipImage:
    """An open_clip CLIP a ``--model module:function`` returned: the default tokenizer for its context
    length, mean/std from its ``visual.preprocess_cfg`` (open_clip's create_model sets it), else OpenAI's."""
    import open_clip

    context = int(getattr(clip, "context_length", 77) or 77)
    pre = _preprocess(getattr(clip.visual, "preprocess_cfg", None))
    return OpenClipImage(clip, open_clip.tokenizer.SimpleTokenizer(context_length=context),
                         pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD))
