"""Baseline files: JSON for values, NPZ for arrays, PNG for plots, with a metadata block.

Writes are atomic (:func:`~pytest_easyquant.atomic_files.atomic_write_bytes`). Files are
byte-identical for identical content (sorted keys, no timestamps, fixed zip dates). Readers
raise :class:`MissingBaseline` for an absent file and :class:`BaselineError` for anything
unusable, each naming the file and the way out.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_easyquant.atomic_files import atomic_write_bytes
from pytest_easyquant.errors import BaselineError, MissingBaseline

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "SCHEMA_VERSION",
    "BaselineError",
    "BaselineMetadata",
    "MissingBaseline",
    "StoredArrays",
    "StoredJSON",
    "read_json",
    "read_npz",
    "read_png",
    "write_json",
    "write_npz",
    "write_png",
]

SCHEMA_VERSION = 1
RERECORD = "re-create it with `pytest --eq-update-baselines`"
META_KEY = "__meta__"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_VERSIONED = ("torch", "torchvision", "numpy", "matplotlib", "pytest_easyquant")
_DISTRIBUTIONS = {"pytest_easyquant": "pytest-easyquant"}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@lru_cache(maxsize=None)
def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(_DISTRIBUTIONS.get(name, name))
    except metadata.PackageNotFoundError:
        if name == "pytest_easyquant":
            from pytest_easyquant import __version__

            return __version__
        return "unknown"


def _canonical(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=_json_default))


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, sub in value.items():
            flat.update(_flatten(f"{prefix}.{key}", sub))
        return flat
    return {prefix: value}


@dataclass(frozen=True)
class BaselineMetadata:
    """What a baseline was recorded with, so a failure can say what changed since."""

    model: str
    weights: str
    recipe: dict[str, Any] = field(hash=False)
    data: str
    seed: int
    calib_batches: int
    device: str
    torch: str
    torchvision: str
    numpy: str
    matplotlib: str
    pytest_easyquant: str
    schema_version: int = SCHEMA_VERSION
    backend: str = "fx"  # the preparation backend taken; baselines from before PT2E were all FX
    libraries: dict[str, str] = field(default_factory=dict, hash=False)  # torchao, timm, transformers where used

    @classmethod
    def current(
        cls, *, model: str, weights: str, recipe: dict[str, Any], data: str, seed: int, calib_batches: int, device: str,
        backend: str = "fx", libraries: tuple[str, ...] = (),
    ) -> BaselineMetadata:
        """This run's metadata, with the installed library versions ("unknown" if absent)."""
        versions = {name: _version(name) for name in _VERSIONED}
        return cls(
            model=model, weights=weights, recipe=dict(recipe), data=data, seed=seed,
            calib_batches=calib_batches, device=device, backend=backend,
            libraries={name: _version(name) for name in libraries}, **versions,
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaselineMetadata:
        """Unknown keys are ignored; missing ones or a non-dict recipe raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"metadata is a {type(data).__name__}, not an object")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n not in ("schema_version", "backend", "libraries")]
        if missing:
            raise ValueError(f"metadata lacks {', '.join(missing)}")
        if not isinstance(data["recipe"], Mapping):
            raise ValueError("metadata recipe is not an object")
        values = {n: data[n] for n in names if n in data}
        values["recipe"] = dict(values["recipe"])
        if "libraries" in values:
            values["libraries"] = dict(values["libraries"])
        return cls(**values)

    def differences(self, other: BaselineMetadata) -> list[str]:
        """Lines like ``torch: baseline 2.14.1, now 2.15.0`` (self = baseline, other = now)."""
        lines = []
        mine, theirs = _canonical(self.recipe), _canonical(other.recipe)
        if mine.get("name") != theirs.get("name"):
            lines.append(f"recipe: baseline {_short(mine.get('name'))}, now {_short(theirs.get('name'))}")
        elif mine != theirs:
            flat_mine, flat_theirs = _flatten("recipe", mine), _flatten("recipe", theirs)
            for key in sorted(set(flat_mine) | set(flat_theirs)):
                if flat_mine.get(key, "(absent)") != flat_theirs.get(key, "(absent)"):
                    lines.append(
                        f"{key}: baseline {_short(flat_mine.get(key, '(absent)'))}, "
                        f"now {_short(flat_theirs.get(key, '(absent)'))}"
                    )
        for name in sorted(set(self.libraries) | set(other.libraries)):
            before, after = self.libraries.get(name, "(absent)"), other.libraries.get(name, "(absent)")
            if before != after:
                lines.append(f"{name}: baseline {_short(before)}, now {_short(after)}")
        for f in fields(self):
            if f.name in ("recipe", "libraries"):
                continue
            before, after = getattr(self, f.name), getattr(other, f.name)
            if before != after:
                lines.append(f"{f.name}: baseline {_short(before)}, now {_short(after)}")
        return lines


@dataclass(frozen=True)
class StoredJSON:
    values: dict[str, Any]
    metadata: BaselineMetadata
    tolerance: dict[str, Any] | None
    schema_version: int


@dataclass(frozen=True)
class StoredArrays:
    arrays: dict[str, np.ndarray]
    metadata: BaselineMetadata
    tolerance: dict[str, Any] | None
    schema_version: int


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise MissingBaseline(
            f"no baseline at {path}; create it with `pytest --eq-update-new-only` "
            "(or `--eq-update-baselines` to re-record all)",
            path=path,
        ) from None
    except OSError as exc:
        raise BaselineError(f"cannot read baseline {path}: {exc.strerror or exc}; {RERECORD}", path=path) from None


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays as plain Python values (float32 via its exact float64 value)."""
    if hasattr(value, "dtype") and hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _encode(document: dict[str, Any], path: Path) -> bytes:
    try:
        return (json.dumps(document, sort_keys=True, indent=2, default=_json_default) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot store values in {path} as JSON: {exc}") from None


def _document(metadata: BaselineMetadata, tolerance: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "metadata": metadata.to_dict(),
        "tolerance": dict(tolerance) if tolerance is not None else None,
    }


def _check_document(document: Any, path: Path) -> tuple[BaselineMetadata, dict[str, Any] | None, int]:
    """Validate the common envelope; returns metadata, tolerance and schema version."""
    if not isinstance(document, dict):
        raise BaselineError(f"baseline {path} does not hold a pytest-easyquant baseline object; {RERECORD}", path=path)
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BaselineError(
            f"baseline {path} has schema version {version!r}, this pytest-easyquant reads version "
            f"{SCHEMA_VERSION}; re-record it with `pytest --eq-update-baselines`",
            path=path,
        )
    try:
        metadata = BaselineMetadata.from_dict(document.get("metadata"))
    except (TypeError, ValueError) as exc:
        raise BaselineError(f"baseline {path} has unusable metadata ({exc}); {RERECORD}", path=path) from None
    tolerance = document.get("tolerance")
    if tolerance is not None and not isinstance(tolerance, dict):
        raise BaselineError(f"baseline {path} has a malformed tolerance block; {RERECORD}", path=path)
    return metadata, tolerance, version


def write_json(
    path: Path, *, values: Mapping[str, Any], metadata: BaselineMetadata, tolerance: Mapping[str, Any] | None = None
) -> None:
    """``{"schema_version", "metadata", "tolerance", "values"}`` as sorted, indented JSON.

    Floats round-trip exactly (``repr``); NaN and infinities are written as ``NaN``/``Infinity``.
    """
    document = _document(metadata, tolerance)
    document["values"] = dict(values)
    atomic_write_bytes(Path(path), _encode(document, Path(path)))


def read_json(path: Path) -> StoredJSON:
    path = Path(path)
    raw = _read_bytes(path)
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BaselineError(f"baseline {path} is not UTF-8 text; {RERECORD}", path=path) from None
    except json.JSONDecodeError as exc:
        raise BaselineError(
            f"baseline {path} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}), "
            f"perhaps truncated or badly merged; {RERECORD}",
            path=path,
        ) from None
    metadata, tolerance, version = _check_document(document, path)
    values = document.get("values")
    if not isinstance(values, dict):
        raise BaselineError(f"baseline {path} has no 'values' object; {RERECORD}", path=path)
    return StoredJSON(values=values, metadata=metadata, tolerance=tolerance, schema_version=version)


def _npy_bytes(array: np.ndarray) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_npz(
    path: Path, *, arrays: Mapping[str, np.ndarray], metadata: BaselineMetadata, tolerance: Mapping[str, Any] | None = None
) -> None:
    """Arrays in an ``.npz`` that ``np.load(allow_pickle=False)`` reads, plus the metadata and
    tolerance JSON as the uint8 entry ``__meta__``.

    Written with fixed zip dates and no compression, so identical arrays give identical bytes
    (``np.savez`` stamps the current time). Object arrays are refused (ValueError).
    """
    import numpy as np

    path = Path(path)
    entries = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name or name == META_KEY:
            raise ValueError(f"array name {name!r} for {path} must be a non-empty string other than {META_KEY!r}")
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise ValueError(f"array {name!r} for {path} has dtype object; store numbers, not Python objects")
        entries[name] = array
    entries[META_KEY] = np.frombuffer(_encode(_document(metadata, tolerance), path), dtype=np.uint8)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.create_system = 3
            info.external_attr = 0o644 << 16
            archive.writestr(info, _npy_bytes(entries[name]))
    atomic_write_bytes(path, buffer.getvalue())


def read_npz(path: Path) -> StoredArrays:
    import numpy as np

    path = Path(path)
    raw = _read_bytes(path)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, struct.error) as exc:
        raise BaselineError(
            f"baseline {path} is not a readable NPZ ({type(exc).__name__}: {exc}), perhaps truncated; {RERECORD}",
            path=path,
        ) from None
    meta = arrays.pop(META_KEY, None)
    if meta is None or meta.dtype != np.uint8 or meta.ndim != 1:
        raise BaselineError(f"baseline {path} has no {META_KEY} entry, so pytest-easyquant did not write it; {RERECORD}", path=path)
    try:
        document = json.loads(meta.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BaselineError(f"baseline {path} has a corrupt {META_KEY} entry; {RERECORD}", path=path) from None
    metadata, tolerance, version = _check_document(document, path)
    return StoredArrays(arrays=arrays, metadata=metadata, tolerance=tolerance, schema_version=version)


def _png_problem(data: bytes) -> str | None:
    """Why ``data`` is not a complete PNG (signature, chunk lengths and CRCs, IEND), or None."""
    if not data.startswith(PNG_SIGNATURE):
        return "does not start with the PNG signature"
    offset = len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        end = offset + 12 + length
        if end > len(data):
            return f"is truncated inside its {kind.decode('latin-1')!r} chunk"
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(data[offset + 4 : end - 4]) != crc:
            return f"has a corrupt {kind.decode('latin-1')!r} chunk (CRC mismatch)"
        if kind == b"IEND":
            return None
        offset = end
    return "is truncated (no IEND chunk)"


def write_png(path: Path, data: bytes) -> None:
    """Store PNG bytes as they are; ValueError if they are not a complete PNG."""
    problem = _png_problem(bytes(data))
    if problem:
        raise ValueError(f"refusing to write {path}: the image data {problem}")
    atomic_write_bytes(Path(path), bytes(data))


def read_png(path: Path) -> bytes:
    path = Path(path)
    data = _read_bytes(path)
    problem = _png_problem(data)
    if problem:
        raise BaselineError(f"baseline {path} {problem}; {RERECORD}", path=path)
    return data
