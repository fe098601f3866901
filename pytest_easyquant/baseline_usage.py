"""Baseline usage: which baseline files this process read or wrote, to report the unused ones."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

BASELINE_SUFFIXES = (".json", ".npz", ".png")
METADATA_SIDECAR = "metadata.json"


class UsageTracker:
    """Which baseline files this process read or wrote, to report the ones nothing used."""

    def __init__(self) -> None:
        self._used: set[Path] = set()

    def mark(self, path: Path) -> None:
        self._used.add(Path(path).resolve())

    @property
    def used(self) -> frozenset[Path]:
        return frozenset(self._used)

    def unused(self, directories: Iterable[Path], expected: set[Path]) -> list[Path]:
        """Baseline files (json/npz/png; no temp files) under ``directories`` that were neither
        used nor are in ``expected`` (the files of deselected items), sorted. A directory's
        ``metadata.json`` sidecar (the plots' metadata) is unused when no plot under it is known."""
        known = self._used | {Path(p).resolve() for p in expected}
        found: set[Path] = set()
        for directory in directories:
            directory = Path(directory)
            if not directory.is_dir():
                continue
            sidecar = directory / METADATA_SIDECAR
            inside = directory.resolve()
            if sidecar.is_file() and not any(p.suffix == ".png" and inside in p.parents for p in known):
                found.add(sidecar)
            for candidate in directory.rglob("*"):
                relative = candidate.relative_to(directory)
                if (
                    candidate.suffix in BASELINE_SUFFIXES
                    and candidate.name != METADATA_SIDECAR
                    and not any(part.startswith(".") for part in relative.parts)
                    and candidate.is_file()
                    and candidate.resolve() not in known
                ):
                    found.add(candidate)
        return sorted(found)


def _holds_baselines(directory: Path) -> bool:
    """Whether ``directory`` has a JSON file that pytest-easyquant wrote (it reads back)."""
    from pytest_easyquant.errors import BaselineError
    from pytest_easyquant.storage import read_json

    for candidate in sorted(directory.glob("*.json")):
        if candidate.name == METADATA_SIDECAR:
            continue
        try:
            read_json(candidate)
        except BaselineError:
            continue
        return True
    return False


def stale_model_dirs(root: Path, run_dirs: Iterable[Path]) -> list[Path]:
    """Baseline directories of models this session no longer runs.

    A run's directory is ``root/<model>-<weights>/<recipe>``; any other ``root/<name>/<recipe>``
    whose ``<name>`` ends in the same ``-<weights>`` and that holds pytest-easyquant baselines
    belongs to a model that was run with the same weights and recipe before and is not now.
    Only meaningful when the session ran every check of its models (no -k/-m/--lf selection).
    """
    runs = {Path(d).resolve() for d in run_dirs}
    root = Path(root)
    configurations = {(d.parent.name.rsplit("-", 1)[-1], d.name) for d in runs if d.parent.parent == root.resolve()}
    stale = []
    for weights, recipe in sorted(configurations):
        for candidate in sorted(root.glob(f"*-{weights}/{recipe}")):
            if candidate.is_dir() and candidate.resolve() not in runs and _holds_baselines(candidate):
                stale.append(candidate)
    return stale


def prune(paths: Iterable[Path], root: Path) -> list[Path]:
    """Delete ``paths`` (files under ``root``) and the folders they leave empty, up to ``root``."""
    root = Path(root).resolve()
    deleted = []
    for path in sorted({Path(p) for p in paths}):
        resolved = path.resolve()
        if root not in resolved.parents or not resolved.is_file():
            continue
        resolved.unlink()
        deleted.append(path)
        folder = resolved.parent
        while folder != root and root in folder.parents and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    return deleted
