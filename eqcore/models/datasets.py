"""The torch Datasets behind the image loaders, and the one way loaders are built.

Everything here is deterministic (fixed order, seeded augmentation, ``num_workers=0``) so that
calibration and evaluation give the same numbers on every run, which the regression baselines need.
Batches are ``(images, labels)`` with int64 labels, ``-1`` meaning "no label" (the metrics skip them).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

from eqcore.errors import EQError
from eqcore.models.specs import InputSpec, _interpolation_mode, _to_normalized_tensor, eval_transform

class _EvalImages(Dataset):
    """Fixed images (loaded lazily through ``loaders``) with eval preprocessing."""

    def __init__(self, loaders: Sequence[Callable[[], Image.Image]], labels: Sequence[int], spec: InputSpec):
        self._loaders = list(loaders)
        self._labels = list(labels)
        self._transform = eval_transform(spec)

    def __len__(self) -> int:
        return len(self._loaders)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._transform(self._loaders[index]()), self._labels[index]


class _AugmentedCrops(Dataset):
    """Seeded RandomResizedCrop + horizontal flip of a few images; item i depends only on (seed, i)."""

    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __init__(
        self,
        loaders: Sequence[Callable[[], Image.Image]],
        labels: Sequence[int],
        spec: InputSpec,
        *,
        count: int,
        seed: int,
    ):
        self._loaders = list(loaders)
        self._labels = list(labels)
        self._spec = spec
        self._mode = _interpolation_mode(spec)
        self._count = count
        self._seed = seed

    def __len__(self) -> int:
        return self._count

    def _crop_box(self, rng: random.Random, height: int, width: int) -> tuple[int, int, int, int]:
        area = height * width
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(log_low, log_high))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        source = index % len(self._loaders)
        rng = random.Random(f"eqcore-calib-{self._seed}-{index}")
        image = self._loaders[source]()
        top, left, h, w = self._crop_box(rng, image.height, image.width)
        image = TF.resized_crop(
            image, top, left, h, w, list(self._spec.shape[1:]), interpolation=self._mode, antialias=True
        )
        if rng.random() < 0.5:
            image = TF.hflip(image)
        return _to_normalized_tensor(image, self._spec), self._labels[source]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise EQError(f"batch_size must be a positive integer, got {batch_size}")


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
