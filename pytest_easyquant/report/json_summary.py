"""``--eq-json PATH``: one JSON document per session, for CI systems (schema: :data:`SCHEMA`).

Written once by the process that ends the session (the xdist controller, with every worker's
checks merged), atomically. ``runs`` holds the generated model runs, each with its configuration,
versions and checks; ``tests`` the checks made by users' tests through ``eq_baseline``. Numbers
that JSON cannot carry (NaN, infinities) are the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.
Documented in docs/report-json.md; bump :data:`SCHEMA_VERSION` on any incompatible change.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pytest_easyquant.atomic_files import atomic_write_bytes
from pytest_easyquant.report.overview import RunOverview, build_overviews
from pytest_easyquant.report.records import MetricRecord

SCHEMA_VERSION = 1
SCHEMA_ID = "https://pytest-easyquant.invalid/schemas/session-summary-1.json"

_VALUE = {"type": ["number", "string", "boolean", "null"]}
_NUMBER = {"type": ["number", "string", "null"]}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}

_METRIC = {
    "type": "object",
    "required": ["name", "baseline", "obtained", "delta", "tolerance", "pass"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "baseline": _VALUE,
        "obtained": _VALUE,
        "delta": _NUMBER,
        "tolerance": {
            "type": "object",
            "required": ["atol", "rtol", "source"],
            "additionalProperties": False,
            "properties": {"atol": _NUMBER, "rtol": _NUMBER, "source": {"type": "string"}},
        },
        "pass": {"type": "boolean"},
        "array": {
            "type": ["object", "null"],
            "required": ["differing", "size", "share", "max_abs", "max_rel", "mean_abs"],
            "properties": {
                "differing": {"type": "integer"}, "size": {"type": "integer"}, "share": {"type": "number"},
                "max_abs": _NUMBER, "max_rel": _NUMBER, "mean_abs": _NUMBER,
            },
        },
        "note": {"type": "string"},
    },
}
_CHECK = {
    "type": "object",
    "required": ["nodeid", "name", "status", "metrics", "artifacts"],
    "additionalProperties": False,
    "properties": {
        "nodeid": {"type": "string"},
        "name": {"type": "string"},
        "status": {"enum": ["passed", "failed", "written", "missing", "error"]},
        "message": {"type": "string"},
        "worker": {"type": "string"},
        "metrics": {"type": "array", "items": _METRIC},
        "artifacts": _STRINGS,
        "baseline_recorded_with": _STRINGS,
        "command": {"type": "string"},
    },
}
_RUN_CONFIG = {
    "type": "object",
    "required": ["model", "weights", "recipe", "baseline_recipe", "backend", "data", "seed", "device"],
    "properties": {
        "model": {"type": "string"}, "weights": {"type": "string"}, "recipe": {"type": "string"},
        "baseline_recipe": {"type": ["string", "null"]}, "backend": {"type": "string"}, "data": {"type": "string"},
        "seed": {"type": "integer"}, "device": {"type": "string"}, "cle": {"type": "boolean"},
        "calib_batches": {"type": "integer"}, "batch_size": {"type": "integer"}, "sa_batches": {"type": "integer"},
    },
}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "pytest-easyquant session summary",
    "type": "object",
    "required": ["schema_version", "generator", "exit_status", "counts", "runs", "tests", "unused_baselines"],
    "additionalProperties": False,
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "generator": {"type": "string"},
        "exit_status": {"type": "integer"},
        "counts": _COUNTS,
        "runs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["suite", "configuration", "versions", "layers", "baseline_dir", "counts", "checks"],
                "additionalProperties": False,
                "properties": {
                    "suite": {"type": "string"},
                    "configuration": _RUN_CONFIG,
                    "versions": {"type": "object", "additionalProperties": {"type": "string"}},
                    "layers": _STRINGS,
                    "baseline_dir": {"type": "string"},
                    "record_command": {"type": "string"},
                    "counts": _COUNTS,
                    "checks": {"type": "array", "items": _CHECK},
                },
            },
        },
        "tests": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["suite", "counts", "checks"],
                "additionalProperties": False,
                "properties": {"suite": {"type": "string"}, "counts": _COUNTS, "checks": {"type": "array", "items": _CHECK}},
            },
        },
        "unused_baselines": _STRINGS,
        "pruned_baselines": _STRINGS,
    },
}


def _number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _metric(row: MetricRecord) -> dict[str, Any]:
    array = None
    if row.array is not None:
        array = {k: _number(v) for k, v in asdict(row.array).items()}
        array["share"] = row.array.share
    document = {
        "name": row.metric,
        "baseline": _number(row.baseline),
        "obtained": _number(row.obtained),
        "delta": _number(row.delta),
        "tolerance": {"atol": _number(row.atol), "rtol": _number(row.rtol), "source": row.source},
        "pass": bool(row.passed),
        "array": array,
    }
    if row.note:
        document["note"] = row.note
    return document


def _check(outcome: Any) -> dict[str, Any]:
    document = {
        "nodeid": outcome.nodeid,
        "name": outcome.check,
        "status": outcome.status,
        "metrics": [_metric(row) for row in outcome.rows],
        "artifacts": [str(Path(a)) for a in outcome.artifacts],
    }
    # A failed check's message is its metric table again: only errors and missing baselines keep theirs.
    message = outcome.message if outcome.status in ("error", "missing") else ""
    for key, value in (("message", message), ("worker", outcome.worker), ("command", outcome.command)):
        if value:
            document[key] = value
    if outcome.metadata_differences:
        document["baseline_recorded_with"] = list(outcome.metadata_differences)
    return document


def _run(overview: RunOverview) -> dict[str, Any]:
    info = overview.info
    configuration = {
        key: getattr(info, key)
        for key in ("model", "weights", "recipe", "baseline_recipe", "backend", "data", "seed", "device",
                    "cle", "calib_batches", "batch_size", "sa_batches")
    }
    return {
        "suite": overview.suite,
        "configuration": configuration,
        "versions": dict(info.versions),
        "layers": list(info.layers),
        "baseline_dir": info.baseline_dir,
        "record_command": info.record_command,
        "counts": overview.counts,
        "checks": [_check(o) for o in overview.outcomes],
    }


def summary_document(session: Any, *, exitstatus: int) -> dict[str, Any]:
    """The session's summary (``session`` is an EQSession) as plain JSON-ready data."""
    from pytest_easyquant import __version__

    overviews = build_overviews(session.outcomes, session.runs_info)
    counts: dict[str, int] = {}
    for overview in overviews:
        for status, n in overview.counts.items():
            counts[status] = counts.get(status, 0) + n
    return {
        "schema_version": SCHEMA_VERSION,
        "generator": f"pytest-easyquant {__version__}",
        "exit_status": exitstatus,
        "counts": counts,
        "runs": [_run(o) for o in overviews if o.info is not None],
        "tests": [
            {"suite": o.suite, "counts": o.counts, "checks": [_check(c) for c in o.outcomes]}
            for o in overviews if o.info is None
        ],
        "unused_baselines": list(session.unused),
        "pruned_baselines": list(session.pruned),
    }


def write_json_summary(session: Any, *, exitstatus: int) -> Path:
    """Write ``--eq-json`` (strict JSON: no NaN literals) and return its path."""
    path = session.options.json
    text = json.dumps(summary_document(session, exitstatus=exitstatus), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))
    return path
