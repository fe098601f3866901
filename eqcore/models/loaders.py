"""Built-in data that works offline: sample photos, scikit-learn's digits, and ImageFolder trees.

``get_loaders`` picks the data source by name (or directory) and builds its calibration and
evaluation loaders for a model's input spec, refusing data that cannot feed that model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from eqcore.errors import EQError
from eqcore.models.datasets import _check_batch_size, _loader
from eqcore.models.digits_data import _check_digits_spec, _normalized_tensor_dataset, digits_loaders, digits_split
from eqcore.models.image_folder import image_folder_loader, scan_image_folder
from eqcore.models.samples import samples_loader
from eqcore.models.specs import InputSpec, imagenet_categories
from eqcore.models.tokens import TokenSpec, tokens_loader

__all__ = [
    "Loaders",
    "get_loaders",
    "tensor_loaders",
    "without_labels",
]

BUILTIN_DATA: tuple[str, ...] = ("samples", "digits", "tokens")


@dataclass(frozen=True)
class Loaders:
    """Calibration and evaluation loaders of one data source, ready for the plugin.

    ``max_label`` is the largest class index the evaluation labels can take: ImageNet's 999 for
    the samples (their labels are ImageNet classes, whichever photos are installed), else the
    largest label present; -1 when unlabeled. A model with fewer outputs cannot be scored on them.
    """

    name: str
    calib: DataLoader
    eval: DataLoader
    has_labels: bool
    num_calib: int
    num_eval: int
    max_label: int = -1


class _Unlabeled(Dataset):
    """Another dataset's images, each labeled -1 ("no label")."""

    def __init__(self, dataset: Dataset) -> None:
        self._dataset = dataset
        self._labels = [-1] * len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._dataset[index][0], -1


def without_labels(loaders: Loaders) -> Loaders:
    """The same data with every evaluation label -1: fidelity can be measured, accuracy is not.

    For a model whose outputs are not the data's classes (a 10-class head on ImageNet-labeled
    photos), where scoring accuracy would compare unrelated class indices.
    """
    evaluation = _loader(_Unlabeled(loaders.eval.dataset), loaders.eval.batch_size or 1)
    return dataclasses.replace(loaders, eval=evaluation, has_labels=False, max_label=-1)


def _dataset_labels(loader: DataLoader) -> list[int]:
    dataset = loader.dataset
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return dataset.tensors[1].tolist()
    return list(dataset._labels)  # type: ignore[attr-defined]


def get_loaders(
    data: str,
    spec: InputSpec | TokenSpec,
    *,
    batch_size: int = 16,
    calib_batches: int = 4,
    seed: int = 0,
    model_name: str | None = None,
) -> Loaders:
    """Calibration and evaluation loaders for ``data`` ("samples", "digits" or a directory).

    - samples: calib = ``calib_batches * batch_size`` seeded augmented crops, eval = each photo once;
    - digits: calib = the first ``calib_batches * batch_size`` training digits, eval = the test split;
    - directory: calib = a seeded subset of ``calib_batches * batch_size`` images, eval = all images;
    - tokens (text models): calib = ``calib_batches * batch_size`` seeded sentences, eval = 32 others.

    Raises EQError when the data cannot feed a model with ``spec`` (e.g. digits for resnet18).
    """
    _check_batch_size(batch_size)
    if calib_batches < 1:
        raise EQError(f"calib_batches must be a positive integer, got {calib_batches}")
    n_calib = calib_batches * batch_size
    who = f"model {model_name!r}" if model_name else "the model"
    if isinstance(spec, TokenSpec) != (data == "tokens"):
        if data == "tokens":
            raise EQError(f"the tokens data are token ids for text models, but {who} takes images; use --eq-data {spec.default_data}")
        raise EQError(
            f"{who} takes token ids, not images ({data!r}); use --eq-data tokens, or bring your own tokenized "
            "data with registry.add_data in conftest.py"
        )
    if data == "tokens":
        calib = tokens_loader(spec, split="calib", batch_size=batch_size, count=n_calib, seed=seed)
        evaluation = tokens_loader(spec, split="eval", batch_size=batch_size)
        name = "tokens"
    elif data == "digits":
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
    has_labels = any(label >= 0 for label in eval_labels)
    if has_labels and name == "samples":
        max_label = len(imagenet_categories()) - 1
    else:
        max_label = max(eval_labels, default=-1)
    return Loaders(
        name=name,
        calib=calib,
        eval=evaluation,
        has_labels=has_labels,
        num_calib=len(calib.dataset),  # type: ignore[arg-type]
        num_eval=len(eval_labels),
        max_label=max_label,
    )


def _tensor_dataset(value: object, what: str) -> torch.utils.data.TensorDataset:
    if isinstance(value, torch.Tensor):
        value = (value, torch.full((value.shape[0],), -1, dtype=torch.long))
    if (
        not isinstance(value, (tuple, list)) or len(value) != 2
        or not all(isinstance(t, torch.Tensor) for t in value) or value[0].shape[0] != value[1].shape[0]
        or value[0].shape[0] == 0
    ):
        raise EQError(
            f"{what} must be a non-empty tensor of model inputs (e.g. token ids, padded) or an "
            "(inputs, labels) pair of tensors with one label per input (-1: unlabeled)"
        )
    return torch.utils.data.TensorDataset(value[0], value[1].long())


def tensor_loaders(name: str, calib: object, evaluation: object, *, batch_size: int = 16) -> Loaders:
    """Loaders over a user's own tensors, e.g. tokenized text: ``calib`` and ``evaluation`` are
    each a tensor of model inputs or an ``(inputs, labels)`` pair (labels -1 where unknown)."""
    _check_batch_size(batch_size)
    calib_set = _tensor_dataset(calib, f"data {name!r}: the calibration part")
    eval_set = _tensor_dataset(evaluation, f"data {name!r}: the evaluation part")
    return Loaders(
        name=name,
        calib=_loader(calib_set, batch_size),
        eval=_loader(eval_set, batch_size),
        has_labels=bool((eval_set.tensors[1] >= 0).any()),
        num_calib=len(calib_set),
        num_eval=len(eval_set),
        max_label=int(eval_set.tensors[1].max()),
    )
