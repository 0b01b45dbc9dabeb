"""Tiny models for tests, importable as ``module:callable`` (tests/ is on sys.path under pytest)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv -> ReLU -> conv (target) -> ReLU -> global average pool -> linear: a CAM-compatible head."""

    def __init__(self, num_classes: int = 4, width: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits, logits.softmax(1)


def tuple_out() -> nn.Module:
    return TupleOut()


def not_a_model() -> str:
    return "nope"


def negative_head() -> nn.Module:
    """Non-negative features and an all-negative classifier: every Grad-CAM map is empty."""
    m = tiny_cnn()
    with torch.no_grad():
        m.fc.weight.copy_(-m.fc.weight.abs() - 0.1)
    return m


class TanhNet(nn.Module):
    """A saturated tanh after the target layer (huge conv weights)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(1000)
        self.squash = nn.Tanh()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.squash(self.conv(x)).mean(dim=(2, 3)))


def tanh_net() -> nn.Module:
    return TanhNet()


class DictOut(nn.Module):
    """Two heads on one trunk in a dict without a 'logits' key: --output-key must choose."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()
        torch.manual_seed(1)
        self.aux = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.net.pool(self.net.features(x)).flatten(1)
        return {"main": self.net.fc(pooled), "aux": self.aux(pooled)}


def dict_out() -> nn.Module:
    return DictOut()


class TinySeg(nn.Module):
    """conv -> ReLU (features, the target layer) -> 1x1 conv to per-pixel class scores: (B, C, h, w)."""

    def __init__(self, classes: int = 3, width: int = 4) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.head(self.features(x))}


def tiny_seg() -> nn.Module:
    return TinySeg()


# -- transformers (random weights, tiny dims) -------------------------------------------------------
def tiny_vit(**kw: object) -> nn.Module:
    """timm ViT: 32x32 input, 8x8 patches (a 4x4 grid), a class token, GELU."""
    from timm.models import VisionTransformer

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=4)
    return VisionTransformer(**{**args, **kw})  # type: ignore[arg-type]


def dynamic_vit() -> nn.Module:
    """timm ViT that takes any size divisible by its 16-pixel patches (timm's pretrained_cfg: mean 0.5)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, depth=1, embed_dim=32, num_heads=2, num_classes=3, reg_tokens=2,
        dynamic_img_size=True,
    )


def dynamic_swin() -> nn.Module:
    """timm Swin that pads any input size: 4x4 patches, three patch mergings (grid stride 32)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 2),
        num_classes=3, strict_img_size=False,
    )


def tv_vit() -> nn.Module:
    """torchvision VisionTransformer with small dims: fixed 64x64 input, 8x8 patches."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero: all logits 0
    return model


class SlowCNN(TinyCNN):
    """tiny_cnn that takes a while per batch, for interrupting a run: once a batch of real images
    (input width 336: 60x40 photos) runs, it creates the file named by $CAMCLI_TEST_STARTED."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os
        import time
        from pathlib import Path

        marker = os.environ.get("CAMCLI_TEST_STARTED")
        if marker and x.shape[-1] == 336:
            Path(marker).touch()
        time.sleep(0.2)
        return super().forward(x)


def slow_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SlowCNN()


def needs_args(num_classes: int) -> nn.Module:
    """A builder camcli cannot call: it needs an argument."""
    return TinyCNN(num_classes)


def raises() -> nn.Module:
    """A builder whose own code fails."""
    raise RuntimeError("checkpoint server unreachable")


class FixedSize(TinyCNN):
    """Flattens its feature map into the head, so it runs at 224 x 224 only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6 * 56 * 56, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def fixed_size() -> nn.Module:
    torch.manual_seed(0)
    return FixedSize()


def second_minus_first(output: torch.Tensor) -> torch.Tensor:
    """A --target callable: output (N, C) -> (N,), the contrast of the second score with the first."""
    return output[:, 1] - output[:, 0]


def char_tokenizer() -> Any:  # noqa: ANN401
    """A CLIPTokenizer of single letters (no merges): 'red' is r, e, d</w>. Built here, no download."""
    import string

    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase)
    vocab = {t: i for i, t in enumerate([*letters, *(c + "</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[])


def clip_model(seed: int = 0, layers: int = 2, width: int = 16, side: int = 32, patch: int = 8) -> nn.Module:
    """A tiny Hugging Face CLIPModel matching char_tokenizer: side/patch squared patch tokens + a class token."""
    from transformers import CLIPConfig, CLIPModel

    vocab = char_tokenizer().get_vocab()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=side, patch_size=patch),
        projection_dim=8,
    )
    return CLIPModel(config).eval()


def tiny_clip() -> nn.Module:
    """A CLIP-style model for --text through module:function: the image tower with its tokenizer."""
    from camcli.models.clip import ClipImage

    return ClipImage(clip_model(), tokenizer=char_tokenizer())
