"""Atomic file writes: a temp file in the same folder, fsynced, then one ``os.replace``.

Readers and concurrent pytest-xdist workers never see a partial file, and a killed process
leaves the previous file intact (and a ``.*.tmp`` file that :func:`cleanup_temp_files` removes).
Baselines and the HTML report are both written this way.
"""

from __future__ import annotations

import os
import tempfile
import time
from functools import lru_cache
from pathlib import Path

TEMP_SUFFIX = ".tmp"


@lru_cache(maxsize=1)
def _file_mode() -> int:
    """0o666 minus the umask: what ``open()`` would give, instead of mkstemp's 0o600."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file.

    The bytes go to a unique temp file in the same folder (``.<name>.<random>.tmp``), are
    fsynced, and replace ``path`` in one ``os.replace``; the temp file is removed on any
    failure. Concurrent writers of one path each replace it whole (the last one wins).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), _file_mode())
        _replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    _fsync_directory(path.parent)


def _replace(source: str, target: Path) -> None:
    # On Windows, replacing a file another process has open fails for a moment; retry briefly.
    for attempt in range(20):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if os.name != "nt" or attempt == 19:
                raise
            time.sleep(0.05)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable where the platform allows opening a directory."""
    if os.name == "nt":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def cleanup_temp_files(directory: Path, *, older_than: float = 3600.0) -> list[Path]:
    """Remove ``.*.tmp`` files left under ``directory`` by killed writers, if older than
    ``older_than`` seconds (younger ones may belong to a writer still running)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    now = time.time()
    removed = []
    for candidate in sorted(directory.rglob(f".*{TEMP_SUFFIX}")):
        try:
            if candidate.is_file() and now - candidate.stat().st_mtime >= older_than:
                candidate.unlink()
                removed.append(candidate)
        except OSError:
            continue
    return removed
