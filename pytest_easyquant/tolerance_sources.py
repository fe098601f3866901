"""The tolerance table of one check: marker > CLI > ini > recorded with the baseline > default.

Gathers the rules of each layer from where they come from (the test's ``eq_tolerance``
markers, the options, the tolerances stored next to a baseline) into a
:class:`~pytest_easyquant.tolerances.ToleranceTable`.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_easyquant.tolerances import DEFAULT_RULES, Tolerance, ToleranceRule, ToleranceTable, parse_rule
from pytest_easyquant.options import EQConfig


def marker_rules(node: pytest.Item) -> list[ToleranceRule]:
    """Rules from ``@pytest.mark.eq_tolerance("<glob> atol=.. rtol=..", ...)`` or
    ``@pytest.mark.eq_tolerance(metric="<glob>", atol=.., rtol=..)`` on the test (closest last)."""
    rules: list[ToleranceRule] = []
    for marker in reversed(list(node.iter_markers("eq_tolerance"))):
        try:
            rules += [parse_rule(text, source="marker") for text in marker.args]
            if marker.kwargs:
                kwargs = dict(marker.kwargs)
                pattern = str(kwargs.pop("metric", "*"))
                unknown = set(kwargs) - {"atol", "rtol"}
                if unknown:
                    raise ValueError(f"unknown keyword(s) {sorted(unknown)}; use metric=, atol=, rtol=")
                tolerance = Tolerance(**{k: float(v) for k, v in kwargs.items()})
                rules.append(ToleranceRule(pattern=pattern, tolerance=tolerance, source="marker"))
        except (TypeError, ValueError) as exc:
            problem = str(exc)
            break
    else:
        return rules
    # The marker is read while the test runs: fail it with one line (a UsageError here would
    # be reported as the test's error, with the plugin's traceback).
    pytest.fail(f"{node.nodeid}: bad eq_tolerance marker: {problem}", pytrace=False)


def recorded_rules(stored: dict[str, Any] | None) -> list[ToleranceRule]:
    """Tolerances written next to a baseline (exact metric names)."""
    rules = []
    for metric, value in sorted((stored or {}).items()):
        try:
            tolerance = Tolerance(atol=float(value.get("atol", 0.0)), rtol=float(value.get("rtol", 0.0)))
        except (AttributeError, TypeError, ValueError):
            continue
        rules.append(ToleranceRule(pattern=metric, tolerance=tolerance, source="baseline"))
    return rules


def tolerance_table(
    node: pytest.Item, options: EQConfig, *, stored: dict[str, Any] | None, extra: list[ToleranceRule] = ()
) -> ToleranceTable:
    """``extra`` rules (a fixture call's own ``tolerances=``) count as markers, closest to the test."""
    return ToleranceTable(
        [*marker_rules(node), *extra, *options.cli_rules, *options.ini_rules, *recorded_rules(stored), *DEFAULT_RULES]
    )
