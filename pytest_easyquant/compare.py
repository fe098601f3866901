"""Comparing obtained values with baselines: nested values, numeric arrays and histograms.

Each compared metric becomes a :class:`~pytest_easyquant.check_report.Row` of the check's
report, with the tolerance that :class:`~pytest_easyquant.tolerances.ToleranceTable` resolves
for it; arrays that differ get a note on how many elements, by how much and where.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from pytest_easyquant.check_report import ArrayDiff, Row, Summary, _cell, _pair_text
from pytest_easyquant.tolerances import Tolerance, ToleranceTable, _is_number

MAX_LISTED_ELEMENTS = 5


def _numeric_array(value: Any) -> np.ndarray | None:
    if isinstance(value, (str, bytes, Mapping)) or value is None:
        return None
    if not isinstance(value, (list, tuple, np.ndarray)):
        return None
    try:
        array = np.asarray(value)
    except ValueError:
        return None
    return array if array.dtype.kind in "biuf" else None


def _summary(value: Any) -> Summary:
    array = np.asarray(value)
    if array.size <= 3 and array.dtype.kind in "biufU":
        return Summary(np.array2string(array.ravel(), precision=6, separator=", "))
    return Summary(f"{array.dtype}{list(array.shape)}")


def _leaves(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_leaves(_join(prefix, key), sub))
        return out
    return {prefix: value}


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "list"
    return type(value).__name__


def compare_values(prefix: str, baseline: Mapping[str, Any], obtained: Mapping[str, Any], table: ToleranceTable) -> list[Row]:
    """Rows for every leaf of two nested mappings, with dotted names ``prefix.key.sub``.

    Numbers use the resolved tolerance; numeric lists/arrays go through :func:`compare_array`;
    other lists element by element; strings, bools and None must be equal. A leaf only in
    ``obtained`` fails as a new metric, one only in ``baseline`` as missing now.
    """
    rows: list[Row] = []
    for key in sorted(set(baseline) | set(obtained), key=str):
        metric = _join(prefix, key)
        if key not in baseline:
            for leaf, value in _leaves(metric, obtained[key]).items():
                tolerance, source = table.resolve(leaf)
                rows.append(Row(leaf, None, _value_cell(value), tolerance, source, False, "not in baseline (new metric)"))
        elif key not in obtained:
            for leaf, value in _leaves(metric, baseline[key]).items():
                tolerance, source = table.resolve(leaf)
                rows.append(Row(leaf, _value_cell(value), None, tolerance, source, False, "missing now"))
        else:
            rows += _compare_leaf(metric, baseline[key], obtained[key], table)
    return rows


def _value_cell(value: Any) -> Any:
    if isinstance(value, (list, tuple, np.ndarray)):
        return _summary(value) if _numeric_array(value) is not None else Summary(_cell(value))
    return value


def _compare_leaf(metric: str, baseline: Any, obtained: Any, table: ToleranceTable) -> list[Row]:
    if isinstance(baseline, Mapping) and isinstance(obtained, Mapping):
        return compare_values(metric, baseline, obtained, table)
    tolerance, source = table.resolve(metric)
    if _is_number(baseline) and _is_number(obtained):
        return [Row(metric, baseline, obtained, tolerance, source, tolerance.allows(baseline, obtained))]
    b_array, o_array = _numeric_array(baseline), _numeric_array(obtained)
    if b_array is not None and o_array is not None:
        return [compare_array(metric, b_array, o_array, tolerance, source)]
    if isinstance(baseline, (list, tuple)) and isinstance(obtained, (list, tuple)):
        if len(baseline) != len(obtained):
            note = f"length differs: baseline {len(baseline)}, now {len(obtained)}"
            return [Row(metric, Summary(_cell(baseline)), Summary(_cell(obtained)), tolerance, source, False, note)]
        return compare_values(metric, dict(enumerate(baseline)), dict(enumerate(obtained)), table)
    if _kind(baseline) != _kind(obtained):
        note = f"type changed: baseline {_kind(baseline)}, now {_kind(obtained)}"
        return [Row(metric, _value_cell(baseline), _value_cell(obtained), tolerance, source, False, note)]
    return [Row(metric, baseline, obtained, tolerance, source, baseline == obtained)]


def _index_text(index: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(i) for i in index) + ("," if len(index) == 1 else "") + ")"


def compare_array(metric: str, baseline: np.ndarray, obtained: np.ndarray, tolerance: Tolerance, source: str) -> Row:
    """One row for two arrays, elementwise with :meth:`Tolerance.allows`.

    On failure ``note`` says how many elements differ, the max abs error (and where), the
    max rel error and the mean abs error over all elements with finite values, then the first
    few differing elements.
    """
    baseline, obtained = np.asarray(baseline), np.asarray(obtained)
    b_text, o_text = _summary(baseline), _summary(obtained)
    if baseline.shape != obtained.shape:
        note = f"shape differs: baseline {baseline.shape}, now {obtained.shape}"
        return Row(metric, b_text, o_text, tolerance, source, False, note)
    numeric = baseline.dtype.kind in "biuf" and obtained.dtype.kind in "biuf"
    if not numeric:
        ok = np.asarray(baseline == obtained, dtype=bool).reshape(baseline.shape)
        if ok.all():
            return Row(metric, b_text, o_text, tolerance, source, True)
        stats = ArrayDiff(differing=int((~ok).sum()), size=ok.size)
        return Row(metric, b_text, o_text, tolerance, source, False, _listing(baseline, obtained, ok, None), array=stats)
    b = baseline.astype(np.float64)
    o = obtained.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        finite = np.isfinite(b) & np.isfinite(o)
        diff = np.where(finite, np.abs(o - b), 0.0)
        ok = (b == o) | (np.isnan(b) & np.isnan(o)) | (finite & (diff <= tolerance.bound(b, o)))
        rel = np.where(finite & (b != 0), diff / np.abs(np.where(b != 0, b, 1.0)), np.where(diff == 0, 0.0, np.inf))
    if ok.all():
        return Row(metric, b_text, o_text, tolerance, source, True)
    size, failing = ok.size, int((~ok).sum())
    parts = [f"{failing} of {size} elements ({100.0 * failing / size:.2f}%) differ"]
    stats = ArrayDiff(differing=failing, size=size)
    if (finite & ~ok).any():
        worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
        parts.append(f"max abs error {diff.max():.6g} at index {_index_text(tuple(int(i) for i in worst))}")
        parts.append(f"max rel error {rel[finite].max():.6g}")
        parts.append(f"mean abs error {diff[finite].mean():.6g}")
        stats = ArrayDiff(failing, size, float(diff.max()), float(rel[finite].max()), float(diff[finite].mean()))
    nonfinite = int((~ok & ~finite).sum())
    if nonfinite:
        parts.append(f"{nonfinite} NaN/inf mismatches")
    note = "; ".join(parts) + "\n" + _listing(baseline, obtained, ok, diff)
    return Row(metric, b_text, o_text, tolerance, source, False, note, array=stats)


def _listing(baseline: np.ndarray, obtained: np.ndarray, ok: np.ndarray, diff: np.ndarray | None) -> str:
    indices = np.argwhere(~ok)
    lines = []
    for index in indices[:MAX_LISTED_ELEMENTS]:
        where = tuple(int(i) for i in index)
        b, o = baseline[where], obtained[where]
        if diff is not None:
            b_text, o_text = _pair_text(b.item(), o.item())
            lines.append(f"at {_index_text(where)}: baseline {b_text}, obtained {o_text}")
        else:
            lines.append(f"at {_index_text(where)}: baseline {b.item()!r}, obtained {o.item()!r}")
    if len(indices) > MAX_LISTED_ELEMENTS:
        lines.append(f"... and {len(indices) - MAX_LISTED_ELEMENTS} more")
    return "\n".join(lines)


def histogram_distance(baseline_counts: Any, obtained_counts: Any) -> float:
    """Total variation distance of the normalized histograms: 0 = identical, 1 = disjoint.

    Both empty (all zero) -> 0, one empty -> 1; NaN if either holds NaN/inf (fails any
    tolerance). ValueError for different lengths or negative counts.
    """
    b = np.asarray(baseline_counts, dtype=np.float64)
    o = np.asarray(obtained_counts, dtype=np.float64)
    if b.shape != o.shape:
        raise ValueError(f"histograms have different bins: {b.shape} vs {o.shape}")
    if not (np.isfinite(b).all() and np.isfinite(o).all()):
        return math.nan
    if (b < 0).any() or (o < 0).any():
        raise ValueError("histogram counts must be >= 0")
    b_total, o_total = b.sum(), o.sum()
    if b_total == 0 or o_total == 0:
        return 0.0 if b_total == o_total else 1.0
    return float(min(1.0, 0.5 * np.abs(b / b_total - o / o_total).sum()))
