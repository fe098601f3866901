"""Key metrics of a check as JUnit XML properties (what ``record_property`` adds), so ``--junitxml``
carries them to CI systems that read no other format.

Per check: its name and status; the number of metrics and of failing ones; then, for a model-wide
check (``fidelity``, ``layer_sqnr``, ...: no ``[target]``) every numeric metric and for a per-layer
check its failing ones, each as ``<metric>`` (obtained), ``<metric>.baseline`` and ``<metric>.delta``.
"""

from __future__ import annotations

from typing import Any

MAX_METRICS = 40


def check_properties(check: str, status: str, rows: list[Any]) -> list[tuple[str, object]]:
    """The properties of one check's outcome (``rows`` are MetricRecords)."""
    failing = [row for row in rows if not row.passed]
    properties: list[tuple[str, object]] = [
        ("easyquant.check", check),
        ("easyquant.status", status),
        ("easyquant.metrics", len(rows)),
        ("easyquant.failed_metrics", len(failing)),
    ]
    model_wide = "[" not in check
    chosen = [row for row in rows if (model_wide and row.is_number) or not row.passed][:MAX_METRICS]
    for row in chosen:
        properties.append((row.metric, row.obtained))
        if row.baseline is not None:
            properties.append((f"{row.metric}.baseline", row.baseline))
        if row.delta is not None:
            properties.append((f"{row.metric}.delta", row.delta))
    return properties
