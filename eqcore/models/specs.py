"""Input specs: what a model expects per sample, and the preprocessing that follows from it.

``InputSpec`` lives here (not in ``zoo``) because it describes what data a model expects; ``zoo``
attaches one to each model and the data loaders preprocess to it. The ImageNet and digits specs
and the evaluation transform (resize, center crop, normalize) are here for the same reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torchvision.transforms import functional as TF

from eqcore.errors import EQError

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "InputSpec",
    "digits_spec",
    "eval_transform",
    "imagenet_categories",
    "imagenet_spec",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Pixel statistics of the digits training split after scaling to [0, 1] (pixel / 16); fixed
# constants so the training script, the zoo and the loaders can never disagree.
DIGITS_MEAN: float = 0.3062
DIGITS_STD: float = 0.3768


@dataclass(frozen=True)
class InputSpec:
    """What a model expects per sample and how to preprocess images for it.

    ``shape`` is (C, H, W); images are resized (shorter side) to ``resize_size``, center-cropped to
    ``crop_size`` and normalized with ``mean``/``std``. ``labels[i]`` names output class ``i``.
    ``default_data`` is the built-in data set that fits the model ("samples" or "digits").
    """

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_size: int
    crop_size: int
    labels: tuple[str, ...] = field(repr=False)
    default_data: str = "samples"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise EQError(f"InputSpec.shape must be (C, H, W) with positive sizes, got {self.shape}")
        channels = self.shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise EQError(
                f"InputSpec mean/std need one value per channel ({channels}), "
                f"got mean={self.mean}, std={self.std}"
            )

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def example_inputs(self, batch_size: int = 1, *, seed: int = 0) -> tuple[torch.Tensor]:
        """A seeded random batch of the right shape, e.g. for ``prepare_qat_fx(..., example_inputs)``."""
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn((batch_size, *self.shape), generator=generator),)


@functools.lru_cache(maxsize=1)
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names in torchvision's order (shipped with torchvision, offline)."""
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_spec(
    *,
    crop_size: int = 224,
    resize_size: int = 256,
    interpolation: str = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> InputSpec:
    """The standard ImageNet input spec (3 x crop x crop, ImageNet mean/std and categories)."""
    return InputSpec(
        shape=(3, crop_size, crop_size),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        resize_size=resize_size,
        crop_size=crop_size,
        labels=imagenet_categories(),
        default_data="samples",
        interpolation=interpolation,
    )


def digits_spec() -> InputSpec:
    """Input spec of the built-in digits model: 1 x 8 x 8, pixel/16 then fixed mean/std, 10 classes."""
    return InputSpec(
        shape=(1, 8, 8),
        mean=(DIGITS_MEAN,),
        std=(DIGITS_STD,),
        resize_size=8,
        crop_size=8,
        labels=tuple(str(d) for d in range(10)),
        default_data="digits",
        interpolation="bilinear",
    )


def _interpolation_mode(spec: InputSpec) -> TF.InterpolationMode:
    try:
        return TF.InterpolationMode(spec.interpolation)
    except ValueError:
        raise EQError(
            f"InputSpec.interpolation {spec.interpolation!r} is not a torchvision InterpolationMode "
            f"(use one of {[m.value for m in TF.InterpolationMode]})"
        ) from None


def _to_normalized_tensor(image: Image.Image, spec: InputSpec) -> torch.Tensor:
    if spec.channels not in (1, 3):
        raise EQError(f"image data can only feed models with 1 or 3 input channels, spec has {spec.shape}")
    tensor = TF.to_tensor(image.convert("L" if spec.channels == 1 else "RGB"))
    return TF.normalize(tensor, list(spec.mean), list(spec.std))


def eval_transform(spec: InputSpec) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation preprocessing: Resize(resize_size) + CenterCrop(crop_size) + ToTensor + Normalize."""
    mode = _interpolation_mode(spec)
    height, width = spec.shape[1:]

    def transform(image: Image.Image) -> torch.Tensor:
        image = TF.resize(image, spec.resize_size, interpolation=mode, antialias=True)
        image = TF.center_crop(image, [height, width])
        return _to_normalized_tensor(image, spec)

    return transform
