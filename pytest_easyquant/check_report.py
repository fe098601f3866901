"""The report of one check: a :class:`Row` per compared metric, collected in a :class:`CheckReport`.

Every comparison (values, arrays, histograms, images) produces rows; :meth:`CheckReport.format`
renders the failing ones as the table a failure prints, and
:func:`~pytest_easyquant.errors.run_check` turns a report with failing rows into a
:class:`~pytest_easyquant.errors.CheckFailure`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from pytest_easyquant.tolerances import Tolerance, _is_number

MAX_CELL = 40


@dataclass(frozen=True)
class ArrayDiff:
    """How two arrays differ: ``differing`` of ``size`` elements, the largest absolute and relative
    and the mean absolute error (over finite elements; None when no finite element differs)."""

    differing: int
    size: int
    max_abs: float | None = None
    max_rel: float | None = None
    mean_abs: float | None = None

    @property
    def share(self) -> float:
        return self.differing / self.size if self.size else 0.0


@dataclass(frozen=True)
class Row:
    """One compared metric. For arrays and images, ``baseline``/``obtained`` are summaries and
    ``note`` holds the details; ``artifacts`` lists files kept for a failed image; ``array``, how
    two arrays differ (set by :func:`~pytest_easyquant.compare.compare_array` on failure)."""

    metric: str
    baseline: Any
    obtained: Any
    tolerance: Tolerance
    tolerance_source: str
    passed: bool
    note: str = ""
    artifacts: tuple[str, ...] = ()
    array: ArrayDiff | None = None

    @property
    def delta(self) -> float | None:
        if _is_number(self.baseline) and _is_number(self.obtained):
            return float(self.obtained) - float(self.baseline)
        return None


def _pair_text(baseline: Any, obtained: Any) -> tuple[str, str]:
    """Both numbers with as few digits as show that they differ (from 6 up to 17)."""
    if not (_is_number(baseline) and _is_number(obtained)):
        return _cell(baseline), _cell(obtained)
    if isinstance(baseline, numbers.Integral) and isinstance(obtained, numbers.Integral):
        return str(int(baseline)), str(int(obtained))
    b, o = float(baseline), float(obtained)
    for digits in range(6, 18):
        left, right = f"{b:.{digits}g}", f"{o:.{digits}g}"
        if left != right or b == o or (math.isnan(b) and math.isnan(o)):
            break
    return left, right


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if _is_number(value):
        return f"{value:.6g}" if not isinstance(value, numbers.Integral) else str(int(value))
    text = repr(value) if isinstance(value, str) and not isinstance(value, Summary) else str(value)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."


class Summary(str):
    """A short description standing in for a value (an array, an image size); shown unquoted."""


@dataclass
class CheckReport:
    """All rows of one check, plus what changed since the baseline was recorded."""

    name: str
    rows: list[Row]
    metadata_differences: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    @property
    def failed_rows(self) -> list[Row]:
        return [row for row in self.rows if not row.passed]

    def format(self, *, only_failures: bool = True) -> str:
        """A table ``metric | baseline | obtained | delta | tolerance``, then the notes of the
        shown rows (array reports, image files), then the recorded-with differences."""
        shown = self.failed_rows if only_failures else list(self.rows)
        failed = len(self.failed_rows)
        if failed:
            head = f"{self.name}: {failed} of {len(self.rows)} metrics outside tolerance"
        else:
            head = f"{self.name}: all {len(self.rows)} metrics within tolerance"
        lines = [head]
        if shown:
            table = [("metric", "baseline", "obtained", "delta", "tolerance")]
            for row in shown:
                baseline, obtained = _pair_text(row.baseline, row.obtained)
                delta = "-" if row.delta is None else f"{row.delta:+.6g}"
                tolerance = f"{row.tolerance.describe()} ({row.tolerance_source})"
                if not only_failures:
                    tolerance += "" if row.passed else "  FAILED"
                table.append((row.metric, baseline, obtained, delta, tolerance))
            widths = [max(len(r[i]) for r in table) for i in range(5)]
            rendered = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
            rendered.insert(1, "  ".join("-" * w for w in widths))
            lines += ["  " + line for line in rendered]
        for row in shown:
            if row.note:
                note_lines = row.note.splitlines()
                lines.append(f"  {row.metric}: {note_lines[0]}")
                lines += ["    " + line for line in note_lines[1:]]
        if self.metadata_differences:
            lines.append("baseline was recorded with:")
            lines += ["  " + line for line in self.metadata_differences]
        lines += self.extra
        return "\n".join(lines)
