"""The built-in ``digits`` model: a small residual CNN for 1x8x8 digits, and its shipped weights.

The trained weights are package data at ``eqcore/assets/digits.pt`` (written by
``scripts/train_digits.py``); ``zoo.get_model("digits")`` loads them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "DigitsNet",
    "digits_weights_path",
]

class _DigitsBlock(nn.Module):
    """Residual block: conv-bn-relu-conv-bn, identity add, relu (one ReLU module per use)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + x)


class DigitsNet(nn.Module):
    """Small residual CNN for 1x8x8 digits: stem, residual block, stride-2 conv, residual block,
    global average pool, linear. FX-traceable, with the conv-bn(-relu) patterns that fusion and
    ``prepare_qat_fx`` look for, so it exercises the whole quantization path in seconds.
    """

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = _DigitsBlock(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * width)
        self.down_relu = nn.ReLU()
        self.layer2 = _DigitsBlock(2 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.down_relu(self.down_bn(self.down(x)))
        x = self.layer2(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def digits_weights_path() -> Path:
    """Where the shipped digits weights live (written by ``scripts/train_digits.py``)."""
    return Path(str(resources.files("eqcore").joinpath("assets", "digits.pt")))
