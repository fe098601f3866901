"""Tolerances: how far an obtained value may be from its baseline, and which tolerance a metric gets.

A :class:`Tolerance` is ``atol``/``rtol``; a :class:`ToleranceRule` gives one to the metric names
matching a glob (:func:`parse_rule` reads ``"<metric-glob> atol=.. rtol=.."``); the
:class:`ToleranceTable` resolves a metric through the layers marker > cli > ini > baseline >
default, whose last resort are the :data:`DEFAULT_RULES`.
"""

from __future__ import annotations

import math
import numbers
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import numpy as np

SOURCES = ("marker", "cli", "ini", "baseline", "default")
RULE_FORM = "<metric-glob> atol=<number> [rtol=<number>]"
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
    # Per-layer sensitivity: sweep SQNRs in dB, SA scores, the SA-vs-sweep rank correlation.
    _default("sensitivity.*sqnr_db atol=0.5"),
    _default("sensitivity.*.top1_agreement atol=0.01"),
    _default("sensitivity.*.sa_score atol=1e-12 rtol=0.05"),
    _default("sensitivity.spearman_sa_vs_isolated atol=0.1"),
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
