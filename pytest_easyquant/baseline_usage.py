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
        """Baseline files (json/npz/png; no temp files or ``metadata.json`` sidecars) under
        ``directories`` that were neither used nor are in ``expected`` (the files of
        deselected items), sorted."""
        known = self._used | {Path(p).resolve() for p in expected}
        found: set[Path] = set()
        for directory in directories:
            directory = Path(directory)
            if not directory.is_dir():
                continue
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
