"""SimCLR/SwAV-style widened ResNets (ResNet-50 w2/w4/w5, VICReg ResNet-50x2 / ResNet-200x2).

These widen *every* channel, stem included: ResNet-50 w2 has a 128-channel ``conv1`` and a 4096-d
output. torchvision's ``wide_resnet50_2`` only widens the bottleneck's inner 3x3, and timm has no
equivalent, so loading a SwAV w2 file into either fails on shapes (or worse, on a lookalike).
Key names are torchvision's (``conv1``, ``layerN.M.conv2``, ``downsample.0``, ``fc``) so the
official state dicts load after their prefix is stripped. ``widen=1`` is numerically identical to
torchvision's ``resnet50`` (SwAV's ConstantPad2d(1) + padding 2 equals padding 3).
"""

from __future__ import annotations

import torch
from torch import nn

DEPTHS: dict[str, list[int]] = {
    "resnet50": [3, 4, 6, 3],
    "resnet101": [3, 4, 23, 3],
    "resnet152": [3, 8, 36, 3],
    "resnet200": [3, 24, 36, 3],
}


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, as in torchvision v1.5) -> 1x1 with a 4x expansion."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class WideResNet(nn.Module):
    """A ResNet whose stem and stage widths are all multiplied by ``widen``.

    ``width`` is the un-widened stem width (64 in every published model; tests use less).
    ``forward`` returns the pooled embedding once ``fc`` is an ``nn.Identity`` (the teacher form).
    """

    def __init__(self, layers: list[int], widen: int = 1, width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        stem = width * widen
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels, planes = stem, stem
        stages = []
        for index, depth in enumerate(layers):
            blocks = []
            for block_index in range(depth):
                stride = 2 if (index > 0 and block_index == 0) else 1
                blocks.append(Bottleneck(in_channels, planes, stride))
                in_channels = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
            planes *= 2
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_channels
        self.fc: nn.Module = nn.Linear(in_channels, num_classes) if num_classes > 0 else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wide_resnet(depth: str = "resnet50", widen: int = 1, width: int = 64, layers: list[int] | None = None,
                num_classes: int = 1000) -> WideResNet:
    """Build e.g. ``wide_resnet("resnet50", widen=2)`` (SwAV RN50-w2, 4096-d) or a custom ``layers``."""
    if layers is None:
        if depth not in DEPTHS:
            from distillctl.errors import unknown_name

            raise unknown_name("wide ResNet depth", depth, list(DEPTHS))
        layers = DEPTHS[depth]
    return WideResNet(list(layers), widen=widen, width=width, num_classes=num_classes)
