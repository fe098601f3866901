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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_easyquant.atomic_files import atomic_write_bytes
from pytest_easyquant.baseline_metadata import SCHEMA_VERSION, BaselineMetadata, json_default
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

RERECORD = "re-create it with `pytest --eq-update-baselines`"
META_KEY = "__meta__"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


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
            reason=f"no baseline at {path}",
        ) from None
    except OSError as exc:
        raise _unusable(f"cannot read baseline {path}: {exc.strerror or exc}", path) from None


def _unusable(reason: str, path: Path) -> BaselineError:
    """A BaselineError for a file that exists but cannot be used; the plugin replaces the generic
    remedy with the command that re-records this file's check."""
    return BaselineError(f"{reason}; {RERECORD}", path=path, reason=reason)


def _npz_problem(exc: BaseException) -> str:
    """What np.load said, except its advice to allow pickles: a baseline never holds any."""
    if "allow_pickle" in str(exc):
        return "it holds pickled Python objects, which pytest-easyquant never writes and does not load"
    text = f"{type(exc).__name__}: {exc}"
    return f"{text}, perhaps truncated"


def _encode(document: dict[str, Any], path: Path) -> bytes:
    try:
        return (json.dumps(document, sort_keys=True, indent=2, default=json_default) + "\n").encode("utf-8")
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
        raise _unusable(f"baseline {path} does not hold a pytest-easyquant baseline object", path)
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _unusable(
            f"baseline {path} has schema version {version!r}, this pytest-easyquant reads version {SCHEMA_VERSION}",
            path,
        )
    try:
        metadata = BaselineMetadata.from_dict(document.get("metadata"))
    except (TypeError, ValueError) as exc:
        raise _unusable(f"baseline {path} has unusable metadata ({exc})", path) from None
    tolerance = document.get("tolerance")
    if tolerance is not None and not isinstance(tolerance, dict):
        raise _unusable(f"baseline {path} has a malformed tolerance block", path)
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
        raise _unusable(f"baseline {path} is not UTF-8 text", path) from None
    except json.JSONDecodeError as exc:
        raise _unusable(
            f"baseline {path} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}), "
            "perhaps truncated or badly merged",
            path,
        ) from None
    metadata, tolerance, version = _check_document(document, path)
    values = document.get("values")
    if not isinstance(values, dict):
        raise _unusable(f"baseline {path} has no 'values' object", path)
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
        raise _unusable(f"baseline {path} is not a readable NPZ ({_npz_problem(exc)})", path) from None
    meta = arrays.pop(META_KEY, None)
    if meta is None or meta.dtype != np.uint8 or meta.ndim != 1:
        raise _unusable(f"baseline {path} has no {META_KEY} entry, so pytest-easyquant did not write it", path)
    try:
        document = json.loads(meta.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _unusable(f"baseline {path} has a corrupt {META_KEY} entry", path) from None
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
        raise _unusable(f"baseline {path} {problem}", path)
    return data
