"""EfficientNet-Lite0 for the bundled weights, without importing timm.

Importing timm imports torchvision, which imports torch._dynamo: about two seconds before the first
image, for one small network. This is the same network as timm's ``efficientnet_lite0`` (PyTorch-style
symmetric padding, ReLU6, no squeeze-excitation): the same module names, module class names, state
dict keys and registration order, and the same operations in the same order, so layer names
(``bn2``, ``blocks.5``), saturation records (``bn2.act``) and maps do not change. A test checks it
against timm module by module and output by output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# timm's arch_def for efficientnet_lite0: (block kind, repeats, kernel, first stride, expansion, out channels)
ARCH = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
STEM, HEAD = 32, 1280


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm followed by an activation (ReLU6) or nothing, as timm's BatchNormAct2d."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act: nn.Module = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int) -> None:
        super().__init__()
        self.has_skip = stride == 1 and cin == cout
        self.conv_dw = _conv(cin, cin, k, stride, groups=cin)
        self.bn1 = BatchNormAct2d(cin)
        self.aa = nn.Identity()
        self.se = nn.Identity()
        self.conv_pw = _conv(cin, cout, 1)
        self.bn2 = BatchNormAct2d(cout, act=False)
        self.drop_path = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.bn2(self.conv_pw(self.se(self.aa(self.bn1(self.conv_dw(x))))))
        return self.drop_path(x) + shortcut if self.has_skip else x


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_skip = stride == 1 and cin == cout
        self.conv_pw = _conv(cin, mid, 1)
        self.bn1 = BatchNormAct2d(mid)
        self.conv_dw = _conv(mid, mid, k, stride, groups=mid)
        self.bn2 = BatchNormAct2d(mid)
        self.aa = nn.Identity()
        self.se = nn.Identity()
        self.conv_pwl = _conv(mid, cout, 1)
        self.bn3 = BatchNormAct2d(cout, act=False)
        self.drop_path = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        x = self.bn3(self.conv_pwl(self.se(self.aa(x))))
        return self.drop_path(x) + shortcut if self.has_skip else x


class SelectAdaptivePool2d(nn.Module):
    """Global average pooling and flatten, as timm's SelectAdaptivePool2d(pool_type='avg', flatten=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.flatten(self.pool(x))


class EfficientNet(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv_stem = _conv(3, STEM, 3, stride=2)
        self.bn1 = BatchNormAct2d(STEM)
        stages = []
        cin = STEM
        for kind, repeats, k, stride, expand, cout in ARCH:
            blocks: list[nn.Module] = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(DepthwiseSeparableConv(cin, cout, k, s) if kind == "ds" else
                              InvertedResidual(cin, cout, k, s, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _conv(cin, HEAD, 1)
        self.bn2 = BatchNormAct2d(HEAD)
        self.global_pool = SelectAdaptivePool2d()
        self.classifier = nn.Linear(HEAD, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(self.global_pool(x))


def efficientnet_lite0(num_classes: int = 1000) -> EfficientNet:
    with torch.device("meta"):  # no random initialisation: the bundled weights replace every tensor
        model = EfficientNet(num_classes)
    return model
