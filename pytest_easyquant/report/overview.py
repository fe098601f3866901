"""What the reports show per model run, computed once from the session's outcomes.

A :class:`RunOverview` groups one suite's outcomes (failing, missing, passing), counts them, picks
the headline metrics and finds the per-layer series to chart. Per-layer rows are found in any
model-wide check (no ``[target]``), so a new check's rows are charted without changes here: a
metric whose dotted name contains one of the run's layer names (``layer_sqnr.layer1.conv1``,
``sensitivity.layers.fc.isolated_sqnr_db``), or lies under a list element whose ``name`` is one
(``sensitivity.rows.3.isolated_sqnr_db`` beside ``sensitivity.rows.3.name == "fc"``), is a point
of the series named by the rest of the path (``layer_sqnr``, ``sensitivity.layers.isolated_sqnr_db``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pytest_easyquant.report.records import MetricRecord, RunInfo

HEADLINE_METRICS = (
    "accuracy.float.top1",
    "accuracy.quantized.top1",
    "accuracy.float.top5",
    "accuracy.quantized.top5",
    "fidelity.sqnr_db",
    "fidelity.top1_agreement",
    "fidelity.kl_divergence",
    "fidelity.cosine_similarity",
)
FAILING = ("failed", "error")
STATUS_ORDER = ("failed", "error", "missing", "passed", "written")


@dataclass(frozen=True)
class LayerPoint:
    layer: str
    baseline: float | None
    now: float | None
    passed: bool


@dataclass(frozen=True)
class LayerSeries:
    """One quantity per layer, in network order (``name`` as in the docstring above)."""

    name: str
    check: str
    points: tuple[LayerPoint, ...]


@dataclass
class RunOverview:
    """One suite of the session: a generated model run (``info`` set) or a user's test."""

    suite: str
    info: RunInfo | None
    outcomes: list[Any]
    headline: list[MetricRecord] = field(default_factory=list)
    series: list[LayerSeries] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        counted = Counter(o.status for o in self.outcomes)
        return {status: counted[status] for status in STATUS_ORDER if counted[status]}

    @property
    def failing(self) -> list[Any]:
        """Failed and errored checks, the model-wide ones (fidelity, layer_sqnr, ...) first."""
        return sorted((o for o in self.outcomes if o.status in FAILING), key=lambda o: ("[" in o.check, o.nodeid))

    @property
    def missing(self) -> list[Any]:
        return [o for o in self.outcomes if o.status == "missing"]

    @property
    def passing(self) -> list[Any]:
        return [o for o in self.outcomes if o.status not in FAILING and o.status != "missing"]

    @property
    def common_differences(self) -> tuple[str, ...]:
        """What changed since recording for every compared check of the run (e.g. the recipe),
        shown once for the run rather than per check."""
        compared = [o.metadata_differences for o in self.outcomes if o.status in ("passed", "failed")]
        if not compared:
            return ()
        shared = set(compared[0]).intersection(*compared[1:])
        return tuple(line for line in compared[0] if line in shared)

    @property
    def run_error(self) -> str:
        """The one-line error several checks share (the model run itself failed), or ""."""
        messages = Counter(o.message for o in self.outcomes if o.status == "error" and o.message and "\n" not in o.message)
        shared = [m for m, n in messages.most_common(1) if n > 1]
        return shared[0] if shared else ""

    @property
    def status(self) -> str:
        for status in STATUS_ORDER:
            if any(o.status == status for o in self.outcomes):
                return status
        return "passed"


def build_overviews(outcomes: Iterable[Any], runs: Mapping[str, RunInfo]) -> list[RunOverview]:
    """One overview per suite that ran a check, model runs first, each sorted by node id."""
    grouped: dict[str, list[Any]] = defaultdict(list)
    for outcome in sorted(outcomes, key=lambda o: o.nodeid):
        grouped[outcome.suite].append(outcome)
    overviews = []
    for suite in sorted(grouped, key=lambda s: (s not in runs, s)):
        info = runs.get(suite)
        suite_outcomes = grouped[suite]
        overview = RunOverview(suite=suite, info=info, outcomes=suite_outcomes)
        overview.headline = headline_rows(suite_outcomes)
        layers = info.layers if info is not None else []
        overview.series = [s for o in suite_outcomes for s in layer_series(o.check, o.rows, layers)]
        overviews.append(overview)
    return overviews


def headline_rows(outcomes: Iterable[Any]) -> list[MetricRecord]:
    by_metric = {row.metric: row for o in outcomes for row in o.rows}
    return [by_metric[name] for name in HEADLINE_METRICS if name in by_metric]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _element_layers(rows: list[MetricRecord], layers: set[str]) -> dict[str, str]:
    """``prefix.<i>`` -> layer, for list elements whose ``name`` row holds a layer name."""
    found = {}
    for row in rows:
        if row.metric.endswith(".name"):
            value = row.obtained if isinstance(row.obtained, str) else row.baseline
            if isinstance(value, str) and value in layers:
                found[row.metric[: -len(".name")]] = value
    return found


def _locate(metric: str, by_length: list[str], elements: dict[str, str]) -> tuple[str, str] | None:
    """(layer, series name) for a metric, or None when it names no layer."""
    for prefix, layer in elements.items():
        if metric.startswith(prefix + "."):
            parent = prefix.rsplit(".", 1)[0]
            return layer, f"{parent}.{metric[len(prefix) + 1:]}"
    padded = f".{metric}."
    for layer in by_length:
        index = padded.find(f".{layer}.")
        if index > 0:
            name = (padded[:index] + padded[index + len(layer) + 1 :]).strip(".")
            return layer, name
    return None


def layer_series(check: str, rows: list[MetricRecord], layers: list[str]) -> list[LayerSeries]:
    """The per-layer series in one check's rows (see the module docstring); at least two
    layers each, in the order of ``layers``."""
    if "[" in check or not layers or not rows:
        return []
    order = {name: index for index, name in enumerate(layers)}
    by_length = sorted(order, key=len, reverse=True)
    elements = _element_layers(rows, set(order))
    points: dict[str, dict[str, LayerPoint]] = defaultdict(dict)
    for row in rows:
        baseline, now = _number(row.baseline), _number(row.obtained)
        if baseline is None and now is None:
            continue
        located = _locate(row.metric, by_length, elements)
        if located is None:
            continue
        layer, name = located
        points[name][layer] = LayerPoint(layer, baseline, now, bool(row.passed))
    return [
        LayerSeries(name, check, tuple(sorted(found.values(), key=lambda p: order[p.layer])))
        for name, found in points.items()
        if len(found) >= 2
    ]
