"""The built-in photos that work offline (matplotlib's, plus scikit-image's when installed).

They feed the ImageNet-style models: evaluated once each with center-crop preprocessing, or
cycled through seeded augmented crops for calibration.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from eqcore.errors import EQError
from eqcore.models.datasets import _AugmentedCrops, _EvalImages, _check_batch_size, _loader
from eqcore.models.specs import InputSpec, imagenet_categories

__all__ = [
    "SampleImage",
    "find_sample",
    "sample_images",
    "samples_loader",
]

@dataclass(frozen=True)
class SampleImage:
    """One built-in photo. ``label`` is an ImageNet category name only where a true class fits."""

    name: str
    description: str
    label: str | None
    _load: Callable[[], Image.Image] = field(repr=False, compare=False)

    @property
    def imagenet_index(self) -> int | None:
        return None if self.label is None else imagenet_categories().index(self.label)

    def load(self) -> Image.Image:
        """The image as an RGB PIL image (cached: the photos are small)."""
        return _load_cached(self.name, self._load).copy()


_IMAGE_CACHE: dict[str, Image.Image] = {}


def _load_cached(name: str, loader: Callable[[], Image.Image]) -> Image.Image:
    if name not in _IMAGE_CACHE:
        _IMAGE_CACHE[name] = loader().convert("RGB")
    return _IMAGE_CACHE[name]


def _grace_hopper() -> Image.Image:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
        return image.convert("RGB")


def _skimage(loader_name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import skimage.data

        if loader_name == "stereo_motorcycle":
            array = skimage.data.stereo_motorcycle()[0]
        else:
            array = getattr(skimage.data, loader_name)()
        return Image.fromarray(np.asarray(array)).convert("RGB")

    return load


def sample_images() -> tuple[SampleImage, ...]:
    """The built-in photos available offline, in a fixed order.

    matplotlib's Grace Hopper portrait is always there; scikit-image's photos are added when
    scikit-image is installed. Labels: grace_hopper "military uniform", chelsea "tabby", coffee
    "espresso"; the rest (astronaut, rocket, motorcycle, camera) have no fitting ImageNet class and
    only serve calibration and fidelity metrics.
    """
    images = [
        SampleImage("grace_hopper", "Grace Hopper in uniform (matplotlib)", "military uniform", _grace_hopper),
    ]
    if importlib.util.find_spec("skimage") is not None:
        images += [
            SampleImage("chelsea", "a tabby cat (scikit-image)", "tabby", _skimage("chelsea")),
            SampleImage("coffee", "an espresso cup on a saucer (scikit-image)", "espresso", _skimage("coffee")),
            SampleImage("astronaut", "astronaut Eileen Collins (scikit-image)", None, _skimage("astronaut")),
            SampleImage("rocket", "a rocket on its launch pad (scikit-image)", None, _skimage("rocket")),
            SampleImage("motorcycle", "a motorcycle in a garage (scikit-image)", None, _skimage("stereo_motorcycle")),
            SampleImage("camera", "the grayscale cameraman (scikit-image)", None, _skimage("camera")),
        ]
    return tuple(images)


def find_sample(name_or_label: str) -> SampleImage:
    """A sample by its name ("chelsea") or by its ImageNet label ("tabby"), case-insensitively."""
    samples = sample_images()
    key = name_or_label.strip().lower()
    for sample in samples:
        if sample.name.lower() == key:
            return sample
    for sample in samples:
        if sample.label is not None and sample.label.lower() == key:
            return sample
    listing = ", ".join(
        f"{s.name} ({s.label})" if s.label else f"{s.name} (unlabeled)" for s in samples
    )
    hint = "" if len(samples) > 1 else " (install scikit-image for more sample photos)"
    raise EQError(
        f"no built-in sample image is named or labeled {name_or_label!r}; available: {listing}{hint}. "
        "Pass one of these names or labels, or a path to your own image file."
    )


def _label_index(spec: InputSpec, label: str | None) -> int:
    if label is None:
        return -1
    try:
        return spec.labels.index(label)
    except ValueError:
        return -1


def samples_loader(
    spec: InputSpec,
    *,
    split: Literal["eval", "calib"] = "eval",
    batch_size: int = 8,
    n_augmented: int = 32,
    seed: int = 0,
) -> DataLoader:
    """Loader over the built-in photos.

    ``split="eval"``: each photo once, center-crop preprocessing. ``split="calib"``: ``n_augmented``
    seeded random resized crops (+ flips) cycling through the photos, for calibration. Labels are
    indices into ``spec.labels`` where the photo's ImageNet label is one of them, else -1.
    """
    _check_batch_size(batch_size)
    samples = sample_images()
    loaders = [sample.load for sample in samples]
    labels = [_label_index(spec, sample.label) for sample in samples]
    if split == "eval":
        dataset: Dataset = _EvalImages(loaders, labels, spec)
    elif split == "calib":
        if n_augmented < 1:
            raise EQError(f"n_augmented must be a positive integer, got {n_augmented}")
        dataset = _AugmentedCrops(loaders, labels, spec, count=n_augmented, seed=seed)
    else:
        raise EQError(f"split must be 'eval' or 'calib', got {split!r}")
    return _loader(dataset, batch_size)
