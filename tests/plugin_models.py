"""Tiny models, a recipe and an image folder for the plugin's pytester sessions (tests/test_plugin.py).

``test_plugin.py`` copies this file into each pytester directory, where a one-line conftest imports
``pytest_easyquant_register`` from it; ``plugin_models:build_tiny`` also serves the
``--eq-model package.module:callable`` form. Everything is small enough that a whole generated
suite runs in about a second.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from eqcore.models.specs import InputSpec
from eqcore.quant.recipes import W8A8

TINY_SPEC = InputSpec(
    shape=(3, 16, 16),
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    resize_size=16,
    crop_size=16,
    labels=("cat", "dog"),
)
# Read by eqcore.models.zoo for the 'plugin_models:build_tiny' form.
eq_input_spec = TINY_SPEC

# A registered recipe of our own: 6-bit weights, the w8a8 activations.
W6A8 = dataclasses.replace(
    W8A8, name="w6a8", description="6-bit per-channel weights", weight=dataclasses.replace(W8A8.weight, bits=6)
)


class Tiny(nn.Module):
    """conv-bn-relu -> conv -> pool -> linear on 3x16x16, two classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv1(x)))
        x = self.pool(self.conv2(x)).flatten(1)
        return self.fc(x)


class NaNNet(Tiny):
    """Like Tiny, but the square root of the second conv's (partly negative) output is NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv1(x)))
        x = self.pool(torch.sqrt(self.conv2(x))).flatten(1)
        return self.fc(x)


class NoQuantizers(nn.Module):
    """Only ReLU and Tanh: nothing a recipe quantizes."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.tanh = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tanh(self.relu(x)).flatten(1)[:, :2]


def build_tiny() -> Tiny:
    return Tiny()


def pytest_easyquant_register(registry) -> None:  # noqa: ANN001 - the plugin's Registry
    registry.add_model("tiny", build_tiny, spec=TINY_SPEC)
    registry.add_model("tiny2", build_tiny, spec=TINY_SPEC)
    registry.add_model("nannet", NaNNet, spec=TINY_SPEC)
    registry.add_model("noquant", NoQuantizers, spec=TINY_SPEC)
    registry.add_recipe(W6A8)


def make_image_folder(root: Path, *, per_class: int = 4, seed: int = 0) -> Path:
    """An ImageFolder tree of random 16x16 RGB PNGs, one sub-folder per class label."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for label in TINY_SPEC.labels:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.randint(0, 256, size=(16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root
