"""Names -> baseline paths: every name is made a safe path component, and every file is
checked to lie inside its baseline directory, so no model, recipe or check name can write
outside it (``..``, absolute paths, drive letters, separators, hidden files).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

MAX_READABLE = 100
MAX_COMPONENT = 110

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DASHES = re.compile(r"-{2,}")
_SUFFIX = re.compile(r"^\.[A-Za-z0-9]+(\.[A-Za-z0-9]+)*$")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}

# Mirrors eqcore.models.weights's rule for telling a weights file from a torchvision weights enum name.
_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".safetensors")
_ENUM_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9_]*\.)?[A-Z][A-Z0-9_]*$")


def _hash8(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def sanitize(part: str) -> str:
    """A safe, non-empty, pure-ASCII single path component for ``part``.

    Keeps ``[A-Za-z0-9._-]``, maps runs of anything else to one ``-`` and strips leading
    ``.``/``-`` (no hidden files, no ``..``) and trailing ``.`` (dropped by Windows); Windows
    device names (``CON``, ``nul.json``) get a ``_`` prefix. A name that had to change or is
    longer than 110 characters gets ``-<8 hex of sha1(part)>`` (readable part cut to 100), so
    different inputs never share a name. Names that are already safe come back unchanged, so ``sanitize`` is idempotent.
    """
    readable = _DASHES.sub("-", _UNSAFE.sub("-", part)).lstrip(".-").rstrip(".")
    reserved = readable.split(".")[0].upper() in _WINDOWS_RESERVED
    if readable == part and not reserved and 0 < len(part) <= MAX_COMPONENT:
        return part
    if reserved:
        readable = "_" + readable
    readable = readable[:MAX_READABLE].rstrip(".-") or "_"
    return f"{readable}-{_hash8(part)}"


def is_weights_path(weights: str) -> bool:
    """Whether ``--eq-weights`` names a file rather than ``none``, ``DEFAULT`` or an enum."""
    if weights in ("none", "DEFAULT"):
        return False
    if os.path.exists(weights) or weights.lower().endswith(_WEIGHT_FILE_SUFFIXES):
        return True
    return os.sep in weights or "/" in weights or not _ENUM_NAME.match(weights)


def weights_label(weights: str, *, root: Path | None = None) -> str:
    """The weights part of a baseline folder name.

    ``none``, ``DEFAULT`` and enum names are kept (sanitized). A file becomes its stem plus 8
    hex of sha1 of its resolved path, taken relative to ``root`` (default: the working
    directory) when it lies inside it, so a checkout at another place finds the same
    baselines for ``--eq-weights checkpoints/model.pt``.
    """
    if not is_weights_path(weights):
        return sanitize(weights)
    resolved = Path(weights).expanduser().resolve()
    base = (root if root is not None else Path.cwd()).resolve()
    try:
        key = resolved.relative_to(base).as_posix()
    except ValueError:
        key = resolved.as_posix()
    return f"{sanitize(resolved.stem or 'weights')}-{_hash8(key)}"


def baseline_dir(root: Path, *, model: str, weights: str, recipe: str, weights_root: Path | None = None) -> Path:
    """``root / "<model>-<weights label>" / "<recipe>"``, every part sanitized."""
    return Path(root) / f"{sanitize(model)}-{weights_label(weights, root=weights_root)}" / sanitize(recipe)


def baseline_file(directory: Path, check: str, suffix: str) -> Path:
    """The file of check ``check`` (``/`` separates subfolders) with ``suffix`` in ``directory``.

    Each component is sanitized; empty components are skipped. ValueError for an empty name,
    a malformed suffix, or a result that resolves outside ``directory``.
    """
    if not _SUFFIX.match(suffix):
        raise ValueError(f"baseline suffix {suffix!r} should look like '.json'")
    parts = [sanitize(p) for p in check.split("/") if p]
    if not parts:
        raise ValueError(f"empty check name {check!r} cannot name a baseline file")
    directory = Path(directory)
    path = directory.joinpath(*parts[:-1], parts[-1] + suffix)
    inside = directory.resolve()
    resolved = path.resolve()
    if resolved == inside or inside not in resolved.parents:
        raise ValueError(f"check name {check!r} maps to {resolved}, outside the baseline directory {inside}")
    return path
