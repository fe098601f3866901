"""scikit-learn's 8x8 digits: the fixed train/test split and its normalized loaders.

The split never changes, so the training script, the tests and the plugin all hold out the same
test digits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from eqcore.errors import EQError
from eqcore.models.datasets import _check_batch_size, _loader
from eqcore.models.specs import InputSpec, digits_spec

__all__ = [
    "DigitsLoaders",
    "DigitsSplit",
    "digits_loaders",
    "digits_split",
]

DIGITS_TEST_FRACTION: float = 0.25
DIGITS_SPLIT_SEED: int = 0


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
