"""Built-in data that works offline: sample photos, scikit-learn's digits, and ImageFolder trees.

Everything here is deterministic (fixed order, seeded augmentation, ``num_workers=0``) so that
calibration and evaluation give the same numbers on every run, which the regression baselines need.
Batches are ``(images, labels)`` with int64 labels, ``-1`` meaning "no label" (the metrics skip them).

``InputSpec`` lives here (not in ``zoo``) because it describes what data a model expects; ``zoo``
attaches one to each model and the loaders below preprocess to it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

from eqcore.errors import EQError

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "DigitsLoaders",
    "DigitsSplit",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderIndex",
    "InputSpec",
    "Loaders",
    "SampleImage",
    "digits_loaders",
    "digits_spec",
    "digits_split",
    "eval_transform",
    "find_sample",
    "get_loaders",
    "image_folder_loader",
    "imagenet_categories",
    "imagenet_spec",
    "sample_images",
    "samples_loader",
    "scan_image_folder",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Pixel statistics of the digits training split after scaling to [0, 1] (pixel / 16); fixed
# constants so the training script, the zoo and the loaders can never disagree.
DIGITS_MEAN: float = 0.3062
DIGITS_STD: float = 0.3768
DIGITS_TEST_FRACTION: float = 0.25
DIGITS_SPLIT_SEED: int = 0

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
)

BUILTIN_DATA: tuple[str, ...] = ("samples", "digits")


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


@dataclass(frozen=True)
class DigitsSplit:
    """scikit-learn's 8x8 digits, scaled to [0, 1] (pixel / 16), shape (N, 1, 8, 8), not normalized.

    ``train_index``/``test_index`` are the rows of ``load_digits()`` in each split (sorted).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_index: np.ndarray
    test_index: np.ndarray


@functools.lru_cache(maxsize=1)
def digits_split() -> DigitsSplit:
    """The fixed stratified train/test split (25% test, seed 0) used by training, tests and plugin.

    Per class, a ``numpy.random.RandomState(0)`` permutation (stable across numpy versions) puts
    ``round(0.25 * n_class)`` images into the test split. The split never changes with a caller's
    seed, so held-out digits can never leak into training or calibration.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise EQError(
            "the digits data needs scikit-learn: pip install scikit-learn "
            "(or pip install 'pytest-easyquant[test]')"
        ) from None
    digits = load_digits()
    images = (digits.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    targets = digits.target.astype(np.int64)
    rng = np.random.RandomState(DIGITS_SPLIT_SEED)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for cls in range(10):
        members = np.flatnonzero(targets == cls)
        members = members[rng.permutation(len(members))]
        n_test = int(round(DIGITS_TEST_FRACTION * len(members)))
        test_idx.extend(members[:n_test].tolist())
        train_idx.extend(members[n_test:].tolist())
    train = np.array(sorted(train_idx))
    test = np.array(sorted(test_idx))
    split = DigitsSplit(images[train], targets[train], images[test], targets[test], train, test)
    for array in (split.x_train, split.y_train, split.x_test, split.y_test, split.train_index, split.test_index):
        array.setflags(write=False)
    return split


def _normalized_tensor_dataset(x: np.ndarray, y: np.ndarray, spec: InputSpec) -> torch.utils.data.TensorDataset:
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    images = (torch.from_numpy(np.array(x, dtype=np.float32)) - mean) / std
    return torch.utils.data.TensorDataset(images, torch.from_numpy(np.array(y, dtype=np.int64)))


@dataclass(frozen=True)
class DigitsLoaders:
    """Deterministic (unshuffled) loaders over the fixed digits split."""

    train: DataLoader
    test: DataLoader


def _check_digits_spec(spec: InputSpec, *, model_name: str | None = None) -> None:
    if spec.shape != (1, 8, 8) or spec.num_classes != 10:
        who = f"model {model_name!r}" if model_name else "the model"
        raise EQError(
            f"the digits data are 1x8x8 grayscale digits with 10 classes, but {who} expects "
            f"{'x'.join(map(str, spec.shape))} inputs and {spec.num_classes} classes; use "
            "--eq-data samples (built-in photos) or an ImageFolder directory for this model, "
            "or --eq-model digits for the digits data"
        )


def digits_loaders(spec: InputSpec | None = None, *, batch_size: int = 64) -> DigitsLoaders:
    """Train/test loaders of the shared digits split, normalized with ``spec`` (default: digits_spec())."""
    _check_batch_size(batch_size)
    spec = digits_spec() if spec is None else spec
    _check_digits_spec(spec)
    split = digits_split()
    return DigitsLoaders(
        train=_loader(_normalized_tensor_dataset(split.x_train, split.y_train, spec), batch_size),
        test=_loader(_normalized_tensor_dataset(split.x_test, split.y_test, spec), batch_size),
    )


@dataclass(frozen=True)
class ImageFolderIndex:
    """The images found under an ImageFolder-style root, in sorted order, with their labels.

    ``labeled`` is True when every class folder name is an integer index below ``num_classes`` or
    one of the spec's labels (case-insensitive, ``_`` may stand for a space); otherwise all labels
    are -1 and ``reason`` says why.
    """

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    class_folders: tuple[str, ...]
    labeled: bool
    reason: str


def _folder_error(path: Path, problem: str) -> EQError:
    return EQError(
        f"data directory {str(path)!r} {problem}; it should be an ImageFolder tree: one sub-folder "
        "per class (named by class index, e.g. '207', or by label, e.g. 'golden_retriever') holding "
        f"image files ({', '.join(IMAGE_EXTENSIONS)}), or a flat folder of images (unlabeled)"
    )


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _folder_label(folder: str, spec: InputSpec, lookup: dict[str, int]) -> int | None:
    if folder.isdigit():
        index = int(folder)
        return index if index < spec.num_classes else None
    key = folder.lower()
    return lookup.get(key, lookup.get(key.replace("_", " ")))


def scan_image_folder(path: str | Path, spec: InputSpec) -> ImageFolderIndex:
    """Index an ImageFolder-style directory (class sub-folders, or a flat folder of images)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise _folder_error(root, "does not exist")
    if not root.is_dir():
        raise _folder_error(root, "is not a directory")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    files: list[Path] = []
    folders: list[str | None] = []
    for class_dir in class_dirs:
        found = sorted(p for p in class_dir.rglob("*") if _is_image(p))
        files += found
        folders += [class_dir.name] * len(found)
    loose = sorted(p for p in root.iterdir() if _is_image(p))
    files += loose
    folders += [None] * len(loose)
    if not files:
        raise _folder_error(root, "contains no images")

    lookup = {label.lower(): i for i, label in reversed(list(enumerate(spec.labels)))}
    names = sorted({f for f in folders if f is not None})
    mapping = {name: _folder_label(name, spec, lookup) for name in names}
    unmatched = [name for name, index in mapping.items() if index is None]
    if loose and names:
        labeled, reason = False, "images lie directly in the root next to class folders"
    elif not names:
        labeled, reason = False, "no class sub-folders"
    elif unmatched:
        labeled, reason = False, f"folder names not matching a class index or label: {unmatched[:5]}"
        if len(unmatched) < len(names):
            warnings.warn(
                f"{root}: {len(unmatched)} of {len(names)} class folders match no class index or label "
                f"of the model ({unmatched[:5]}...), so accuracy is not computed; rename them to class "
                "indices or labels to get accuracy",
                UserWarning,
                stacklevel=3,
            )
    else:
        labeled, reason = True, "class folders map to the model's classes"
    labels = tuple(mapping[f] if labeled and f is not None else -1 for f in folders)  # type: ignore[misc]
    return ImageFolderIndex(root, tuple(files), labels, tuple(names), labeled, reason)


def _open_image(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as exc:
            raise EQError(f"cannot read image {str(path)!r}: {exc}; remove or replace the file") from exc

    return load


def image_folder_loader(
    path: str | Path,
    spec: InputSpec,
    *,
    batch_size: int = 32,
    indices: Sequence[int] | None = None,
) -> DataLoader:
    """Eval-preprocessed loader over an ImageFolder directory (all images, or the given ``indices``).

    Labels follow :func:`scan_image_folder`: meaningful when class folders are named by class index
    or by the spec's labels, otherwise -1 (fidelity metrics still work, accuracy does not).
    """
    _check_batch_size(batch_size)
    index = scan_image_folder(path, spec)
    chosen = range(len(index.files)) if indices is None else list(indices)
    loaders = [_open_image(index.files[i]) for i in chosen]
    labels = [index.labels[i] for i in chosen]
    return _loader(_EvalImages(loaders, labels, spec), batch_size)


@dataclass(frozen=True)
class Loaders:
    """Calibration and evaluation loaders of one data source, ready for the plugin."""

    name: str
    calib: DataLoader
    eval: DataLoader
    has_labels: bool
    num_calib: int
    num_eval: int


def _dataset_labels(loader: DataLoader) -> list[int]:
    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return dataset.tensors[1].tolist()
    return list(dataset._labels)  # type: ignore[attr-defined]


def get_loaders(
    data: str,
    spec: InputSpec,
    *,
    batch_size: int = 16,
    calib_batches: int = 4,
    seed: int = 0,
    model_name: str | None = None,
) -> Loaders:
    """Calibration and evaluation loaders for ``data`` ("samples", "digits" or a directory).

    - samples: calib = ``calib_batches * batch_size`` seeded augmented crops, eval = each photo once;
    - digits: calib = the first ``calib_batches * batch_size`` training digits, eval = the test split;
    - directory: calib = a seeded subset of ``calib_batches * batch_size`` images, eval = all images.

    Raises EQError when the data cannot feed a model with ``spec`` (e.g. digits for resnet18).
    """
    _check_batch_size(batch_size)
    if calib_batches < 1:
        raise EQError(f"calib_batches must be a positive integer, got {calib_batches}")
    n_calib = calib_batches * batch_size
    who = f"model {model_name!r}" if model_name else "the model"
    if data == "digits":
        _check_digits_spec(spec, model_name=model_name)
        split = digits_split()
        n = min(n_calib, len(split.y_train))
        calib = _loader(_normalized_tensor_dataset(split.x_train[:n], split.y_train[:n], spec), batch_size)
        evaluation = digits_loaders(spec, batch_size=batch_size).test
        name = "digits"
    elif data == "samples":
        if spec.default_data == "digits" or spec.channels not in (1, 3):
            raise EQError(
                f"the samples data are ImageNet-style photos, but {who} expects "
                f"{'x'.join(map(str, spec.shape))} inputs ({spec.default_data} data); "
                f"use --eq-data {spec.default_data} for this model"
            )
        calib = samples_loader(spec, split="calib", batch_size=batch_size, n_augmented=n_calib, seed=seed)
        evaluation = samples_loader(spec, split="eval", batch_size=batch_size)
        name = "samples"
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise EQError(
                f"--eq-data {data!r} is neither a built-in data set ({', '.join(BUILTIN_DATA)}) nor an "
                "existing directory; pass 'samples', 'digits' or the path of an ImageFolder directory"
            )
        if spec.channels not in (1, 3):
            raise EQError(f"image folders can only feed 1- or 3-channel models; {who} expects {spec.shape}")
        index = scan_image_folder(path, spec)
        order = np.random.RandomState(seed).permutation(len(index.files))[:n_calib]
        calib = image_folder_loader(path, spec, batch_size=batch_size, indices=sorted(order.tolist()))
        evaluation = image_folder_loader(path, spec, batch_size=batch_size)
        name = str(path)
    eval_labels = _dataset_labels(evaluation)
    return Loaders(
        name=name,
        calib=calib,
        eval=evaluation,
        has_labels=any(label >= 0 for label in eval_labels),
        num_calib=len(calib.dataset),  # type: ignore[arg-type]
        num_eval=len(eval_labels),
    )
