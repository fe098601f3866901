"""ImageFolder-style directories: indexing their images and labels, and loading them.

Class sub-folders named by class index or by the spec's labels give labeled data; anything else
(including a flat folder of images) is loaded unlabeled.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import DataLoader

from eqcore.errors import EQError
from eqcore.models.datasets import _EvalImages, _check_batch_size, _loader
from eqcore.models.specs import InputSpec

__all__ = [
    "ImageFolderIndex",
    "image_folder_loader",
    "scan_image_folder",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
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
