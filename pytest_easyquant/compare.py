"""Comparing obtained values with baselines: tolerances, report rows, and the one check routine.

Every comparison (values, arrays, histograms, images) produces :class:`Row` objects collected
in a :class:`CheckReport`; :func:`run_check` is the single place that turns a report with
failing rows into a :class:`~pytest_easyquant.errors.CheckFailure`.
"""

from __future__ import annotations

import math
import numbers
import re
import shutil
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np

from pytest_easyquant.errors import CheckFailure
from pytest_easyquant.naming import sanitize

SOURCES = ("marker", "cli", "ini", "baseline", "default")
RULE_FORM = "<metric-glob> atol=<number> [rtol=<number>]"
MAX_LISTED_ELEMENTS = 5
MAX_CELL = 40
# Relative slack of a few ULPs on a non-zero bound, so that decimal boundaries hold as written
# (1.0 -> 1.1 with atol=0.1 differs by 0.10000000000000009 in binary). Zero tolerance stays exact.
_ULP_SLACK = 4 * sys.float_info.epsilon


def _is_number(value: Any) -> bool:
    return isinstance(value, (numbers.Real, np.number)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class Tolerance:
    """``|obtained - baseline| <= atol + rtol * |baseline|`` (plus a few ULPs of float rounding
    when that bound is not 0); NaN equals NaN, equal infinities pass, and NaN or an infinity
    against anything else fails whatever the tolerance."""

    atol: float = 0.0
    rtol: float = 0.0

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if not _is_number(value) or math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")

    def allows(self, baseline: float, obtained: float) -> bool:
        baseline, obtained = float(baseline), float(obtained)
        if baseline == obtained or (math.isnan(baseline) and math.isnan(obtained)):
            return True
        if not (math.isfinite(baseline) and math.isfinite(obtained)):
            return False
        return bool(abs(obtained - baseline) <= self.bound(baseline, obtained))

    def bound(self, baseline: Any, obtained: Any) -> Any:
        """The allowed absolute difference (floats or numpy arrays of them)."""
        bound = self.atol + self.rtol * abs(baseline)
        if self.atol == 0 and self.rtol == 0:
            return bound
        return bound + _ULP_SLACK * np.maximum(abs(baseline), abs(obtained))

    def describe(self) -> str:
        return f"atol={self.atol:g} rtol={self.rtol:g}"


@dataclass(frozen=True)
class ToleranceRule:
    """A tolerance for metric names matching ``pattern`` (an ``fnmatch`` glob, case-sensitive)."""

    pattern: str
    tolerance: Tolerance
    source: str

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"tolerance source {self.source!r} is not one of {', '.join(SOURCES)}")

    def matches(self, metric: str) -> bool:
        return fnmatchcase(metric, self.pattern)


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf"


def parse_rule(text: str, *, source: str) -> ToleranceRule:
    """``"fidelity.* atol=0.1 rtol=0.01"`` -> ToleranceRule; ValueError naming ``text`` otherwise.

    At least one of ``atol``/``rtol`` is needed (the other is 0); ``inf`` ignores a metric.
    """

    def bad(reason: str) -> ValueError:
        return ValueError(f"bad tolerance rule {text!r}: {reason}; expected {RULE_FORM}")

    if not isinstance(text, str):
        raise bad(f"a rule is a string, not {type(text).__name__}")
    tokens = text.split()
    if len(tokens) < 2:
        raise bad("needs a metric glob and at least one of atol=, rtol=")
    pattern, settings = tokens[0], {}
    if "=" in pattern:
        raise bad("the first word must be the metric glob")
    for token in tokens[1:]:
        key, sep, value = token.partition("=")
        if not sep or key not in ("atol", "rtol"):
            raise bad(f"unknown setting {token!r}")
        if key in settings:
            raise bad(f"{key} given twice")
        if not re.fullmatch(_NUMBER, value, flags=re.IGNORECASE):
            raise bad(f"{key} value {value!r} is not a number")
        settings[key] = float(value)
    try:
        tolerance = Tolerance(**settings)
    except ValueError as exc:
        raise bad(str(exc)) from None
    return ToleranceRule(pattern=pattern, tolerance=tolerance, source=source)


def _default(text: str) -> ToleranceRule:
    return parse_rule(text, source="default")


DEFAULT_RULES: list[ToleranceRule] = [
    # Last resort: float noise only (later, more specific rules override it).
    _default("* atol=1e-6 rtol=1e-6"),
    # Top-1/top-5 accuracy fractions: one image in a hundred.
    _default("accuracy.* atol=0.01"),
    # Output SQNR in dB: a tenth of a dB is well below what any real change moves.
    _default("fidelity.sqnr_db atol=0.1"),
    # Share of top-1 predictions equal to the float model's.
    _default("fidelity.top1_agreement atol=0.01"),
    # KL divergence is tiny for good models; allow 5% relative drift plus float noise.
    _default("fidelity.kl_divergence atol=1e-4 rtol=0.05"),
    _default("fidelity.cosine_similarity atol=1e-4"),
    # Per-layer SQNR in dB.
    _default("layer_sqnr.* atol=0.1"),
    # Scales and zero points are deterministic given the data; allow float32 rounding only.
    _default("qparams.* atol=1e-8 rtol=1e-4"),
    # Histogram statistics (clamped shares, grid range, intra-bin profile).
    _default("histogram.* atol=1e-3 rtol=1e-3"),
    # Total variation distance between normalized histograms (0 = same, 1 = disjoint).
    _default("histogram.*.distance atol=0.01"),
    # SA scores are sums of gradients: reduction order moves them by a few percent.
    _default("sa.*.score atol=1e-12 rtol=0.05"),
    _default("histogram.*.score atol=1e-12 rtol=0.05"),
    # Images: RMS pixel difference on the 0-255 scale (matplotlib's compare_images).
    _default("image.* atol=1.0"),
]


class ToleranceTable:
    """Rules in layers: marker > cli > ini > baseline > default.

    :meth:`resolve` takes the highest layer with a matching rule, and within that layer the
    last matching rule (later lines override earlier ones, so put catch-alls first).
    """

    def __init__(self, rules: Iterable[ToleranceRule] = ()) -> None:
        self.layers: dict[str, list[ToleranceRule]] = {source: [] for source in SOURCES}
        for rule in rules:
            self.layers[rule.source].append(rule)

    @property
    def rules(self) -> list[ToleranceRule]:
        return [rule for source in SOURCES for rule in self.layers[source]]

    def resolve(self, metric: str) -> tuple[Tolerance, str]:
        """The tolerance for ``metric`` and the layer it came from (exact if nothing matches)."""
        for source in SOURCES:
            for rule in reversed(self.layers[source]):
                if rule.matches(metric):
                    return rule.tolerance, source
        return Tolerance(), "default"

    def __repr__(self) -> str:
        return f"ToleranceTable({self.rules!r})"


@dataclass(frozen=True)
class Row:
    """One compared metric. For arrays and images, ``baseline``/``obtained`` are summaries and
    ``note`` holds the details; ``artifacts`` lists files kept for a failed image."""

    metric: str
    baseline: Any
    obtained: Any
    tolerance: Tolerance
    tolerance_source: str
    passed: bool
    note: str = ""
    artifacts: tuple[str, ...] = ()

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


def run_check(report: CheckReport) -> None:
    """The one routine every check ends in: raise CheckFailure if any row failed."""
    if not report.passed:
        raise CheckFailure(report)


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


class Summary(str):
    """A short description standing in for a value (an array, an image size); shown unquoted."""


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
        return Row(metric, b_text, o_text, tolerance, source, False, _listing(baseline, obtained, ok, None))
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
    if (finite & ~ok).any():
        worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
        parts.append(f"max abs error {diff.max():.6g} at index {_index_text(tuple(int(i) for i in worst))}")
        parts.append(f"max rel error {rel[finite].max():.6g}")
        parts.append(f"mean abs error {diff[finite].mean():.6g}")
    nonfinite = int((~ok & ~finite).sum())
    if nonfinite:
        parts.append(f"{nonfinite} NaN/inf mismatches")
    note = "; ".join(parts) + "\n" + _listing(baseline, obtained, ok, diff)
    return Row(metric, b_text, o_text, tolerance, source, False, note)


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


@dataclass(frozen=True)
class ImageArtifacts:
    """The files kept for a failed image comparison."""

    baseline: str
    result: str
    diff: str | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.baseline, self.result, self.diff) if p)


def _png_size(data: bytes | None) -> tuple[int, int] | None:
    if not data or len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def compare_image(
    metric: str,
    baseline_png: bytes | None,
    obtained_png: bytes | None,
    tolerance: Tolerance,
    source: str,
    *,
    results_dir: Path,
) -> Row:
    """Compare two PNGs by matplotlib's RMS (0-255 scale); passes if RMS <= ``tolerance.atol``.

    Works in ``results_dir/<metric>/``: ``baseline.png`` and ``result.png`` (and ``diff.png``
    when pixels differ) are kept on failure and listed in ``note`` and ``artifacts``; on
    success the folder is removed.
    """
    folder = Path(results_dir) / sanitize(metric)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    b_size, o_size = _png_size(baseline_png), _png_size(obtained_png)
    if b_size is None or o_size is None:
        which = "baseline" if b_size is None else "obtained"
        return Row(metric, _size_text(b_size), _size_text(o_size), tolerance, source, False, f"the {which} image is not a PNG")
    folder.mkdir(parents=True, exist_ok=True)
    expected, actual = folder / "baseline.png", folder / "result.png"
    expected.write_bytes(baseline_png)
    actual.write_bytes(obtained_png)
    if b_size != o_size:
        artifacts = ImageArtifacts(str(expected), str(actual))
        note = f"image size differs: baseline {_size_text(b_size)}, now {_size_text(o_size)}\n" + _files_text(artifacts)
        return Row(metric, _size_text(b_size), _size_text(o_size), tolerance, source, False, note, artifacts.paths)
    from matplotlib.testing.compare import compare_images
    from matplotlib.testing.exceptions import ImageComparisonFailure

    try:
        # tol=0: None only for identical pixels, otherwise the RMS and a diff image.
        result = compare_images(str(expected), str(actual), tol=0, in_decorator=True)
    except ImageComparisonFailure as exc:
        artifacts = ImageArtifacts(str(expected), str(actual))
        note = f"images cannot be compared: {exc}\n" + _files_text(artifacts)
        return Row(metric, Summary("baseline.png"), Summary("result.png"), tolerance, source, False, note, artifacts.paths)
    rms = 0.0 if result is None else float(result["rms"])
    matplotlib_diff = folder / "result-failed-diff.png"
    if rms <= tolerance.atol:
        shutil.rmtree(folder, ignore_errors=True)
        return Row(metric, 0.0, rms, tolerance, source, True)
    diff = folder / "diff.png"
    if matplotlib_diff.exists():
        matplotlib_diff.replace(diff)
    artifacts = ImageArtifacts(str(expected), str(actual), str(diff) if diff.exists() else None)
    note = f"RMS pixel difference {rms:.4g} (0-255 scale) > {tolerance.atol:g}\n" + _files_text(artifacts)
    return Row(metric, 0.0, rms, tolerance, source, False, note, artifacts.paths)


def _size_text(size: tuple[int, int] | None) -> Summary:
    return Summary("not a PNG" if size is None else f"{size[0]}x{size[1]}")


def _files_text(artifacts: ImageArtifacts) -> str:
    lines = [f"baseline: {artifacts.baseline}", f"result:   {artifacts.result}"]
    if artifacts.diff:
        lines.append(f"diff:     {artifacts.diff}")
    return "\n".join(lines)
