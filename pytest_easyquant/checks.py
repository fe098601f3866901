"""The checks of a generated suite: what each one measures, stores and compares.

A check turns a :class:`~pytest_easyquant.pipeline.ModelRun` into a :class:`Payload` (JSON values,
NPZ arrays or a PNG) and compares a stored payload with a new one into report rows. Storing,
tolerances and failing are the item's job (``suite.py``), the same for every check.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from typing import TYPE_CHECKING

from pytest_easyquant.check_report import Row
from pytest_easyquant.compare import compare_values, histogram_distance
from pytest_easyquant.image_compare import compare_image
from pytest_easyquant.tolerances import ToleranceTable

if TYPE_CHECKING:
    from pytest_easyquant.pipeline import ModelRun, Plan

STAT_FIELDS = ("clamped_below", "clamped_above", "zero_bin", "off_centroid", "grid_min", "grid_max", "nan_count", "inf_count")


@dataclass
class Payload:
    """What a check stores: JSON values, NPZ arrays and/or PNG bytes."""

    values: dict[str, Any] | None = None
    arrays: dict[str, np.ndarray] | None = None
    png: bytes | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # lines for the terminal summary and the report
    attachments: dict[str, bytes] = field(default_factory=dict)  # files shown in the report, by name


@dataclass(frozen=True)
class Check:
    """One generated check: ``kind`` and, for per-module checks, the module or plot name."""

    kind: str
    target: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.target}]" if self.target else self.kind

    @property
    def storage_key(self) -> str:
        folder = {
            "qparams": "qparams",
            "act_hist": "histograms/activations",
            "weight_hist": "histograms/weights",
            "plot": "plots",
        }.get(self.kind)
        return f"{folder}/{self.target}" if folder else self.kind

    @property
    def suffixes(self) -> tuple[str, ...]:
        if self.kind == "plot":
            return (".png",)
        if self.kind in ("act_hist", "weight_hist"):
            return (".json", ".npz")
        return (".json",)

    def obtain(self, run: ModelRun) -> Payload:
        return _OBTAIN[self.kind](run, self.target)

    def compare(self, stored: Payload, obtained: Payload, table: ToleranceTable, *, results_dir: Path) -> list[Row]:
        if self.kind == "plot":
            metric = f"image.{self.target}"
            tolerance, source = table.resolve(metric)
            return [compare_image(metric, stored.png, obtained.png, tolerance, source, results_dir=results_dir)]
        rows = compare_values(self.metric_prefix, stored.values or {}, obtained.values or {}, table)
        if self.kind in ("act_hist", "weight_hist"):
            rows += _distance_rows(self.metric_prefix, stored.arrays or {}, obtained.arrays or {}, table)
        return rows

    @property
    def metric_prefix(self) -> str:
        if self.kind in ("act_hist", "weight_hist"):
            return f"histogram.{self.target}"
        if self.kind == "qparams":
            return f"qparams.{self.target}"
        return self.kind


def plan_checks(plan: Plan, *, plots: bool, sensitivity: bool = True) -> list[Check]:
    """Every check of a model's suite, in a stable order."""
    checks = [Check("accuracy")] if plan.loaders.has_labels else []
    checks += [Check("fidelity"), Check("layer_sqnr")]
    checks += [Check("sensitivity")] if sensitivity else []
    checks += [Check("qparams", name) for name in plan.quantizers]
    checks += [Check("act_hist", name) for name in plan.activation_quantizers]
    checks += [Check("weight_hist", name) for name in plan.weight_modules]
    if plots:
        checks += [Check("plot", f"act-sa-{name}") for name in plan.activation_quantizers]
        checks += [Check("plot", f"weight-sa-{name}") for name in plan.weight_modules]
        checks += [Check("plot", "sensitivity")] if sensitivity else []
    return checks


def _accuracy(run: ModelRun, _: str | None) -> Payload:
    def block(evaluation: Any) -> dict[str, float]:
        return {"top1": evaluation.top1, "top5": evaluation.top5}

    return Payload(
        values={
            "float": block(run.float_eval),
            "quantized": block(run.quant_eval),
            "num_labeled": run.quant_eval.num_labeled,
        }
    )


def _fidelity(run: ModelRun, _: str | None) -> Payload:
    values = {k: float(v) for k, v in asdict(run.fidelity).items()}
    problems = []
    if not np.isfinite(run.quant_eval.logits.numpy()).all():
        problems.append("the fake-quant model's output contains NaN or inf")
    if not np.isfinite(run.float_eval.logits.numpy()).all():
        problems.append("the float model's output contains NaN or inf")
    return Payload(values=values, problems=problems)


def _layer_sqnr(run: ModelRun, _: str | None) -> Payload:
    return Payload(values={name: float(db) for name, db in run.layer_sqnr.items()})


def _qparams(run: ModelRun, target: str | None) -> Payload:
    qp = run.qparams[target]
    values = {"scale": [float(s) for s in qp.scale], "zero_point": [int(z) for z in qp.zero_point]}
    problems = [] if np.isfinite(qp.scale).all() else [f"{target} has a non-finite scale"]
    return Payload(values=values, problems=problems)


def _stats_dict(stats: Any) -> dict[str, Any]:
    values = {name: _plain(getattr(stats, name)) for name in STAT_FIELDS}
    values["intra_bin_profile"] = [float(v) for v in stats.intra_bin_profile]
    return values


def _plain(value: Any) -> Any:
    if isinstance(value, (int, np.integer)):
        return int(value)
    return float(value)


def _nonfinite_problem(name: str, what: str, stats: Any) -> list[str]:
    if not stats.has_nonfinite:
        return []
    return [f"{name} {what} {stats.nan_count} NaN and {stats.inf_count} inf values"]


def _act_hist(run: ModelRun, target: str | None) -> Payload:
    sa = run.sa.activations.get(target)
    if sa is None:
        message = run.sa.errors.get(target, "it was never called during the SA pass")
        return Payload(values={}, arrays={}, problems=[f"no histogram for {target}: {message}"])
    values = {"forward": _stats_dict(sa.stats), "gradient": _stats_dict(sa.grad_stats), "score": float(sa.score)}
    arrays = {"counts": np.asarray(sa.hist, dtype=np.float64), "binned_grads": np.asarray(sa.binned_grads)}
    problems = _nonfinite_problem(target, "produced", sa.stats) + _nonfinite_problem(target, "received gradients with", sa.grad_stats)
    return Payload(values=values, arrays=arrays, problems=problems)


def _weight_hist(run: ModelRun, target: str | None) -> Payload:
    weight = run.sa.weights.get(target)
    if weight is None:
        return Payload(values={}, arrays={}, problems=[f"no weight histogram for {target}"])
    values: dict[str, Any] = {"forward": _stats_dict(weight.stats)}
    arrays = {"counts": np.asarray(weight.hist, dtype=np.float64)}
    problems = _nonfinite_problem(target, "has weights with", weight.stats)
    if weight.gradients is not None:
        values["gradient"] = _stats_dict(weight.grad_stats)
        problems += _nonfinite_problem(target, "received gradients with", weight.grad_stats)
        values["score"] = float(weight.score) if weight.score is not None else math.nan
        arrays["binned_grads"] = np.asarray(weight.binned_grads)
    return Payload(values=values, arrays=arrays, problems=problems)


def _plot(run: ModelRun, target: str | None) -> Payload:
    from pytest_easyquant.plotting import render_check_plot

    png = render_check_plot(run, target)
    return Payload(png=png, attachments={f"{target}.png": png} if target == "sensitivity" else {})


def _sensitivity(run: ModelRun, _: str | None) -> Payload:
    from pytest_easyquant.sensitivity import sensitivity_payload

    values, notes = sensitivity_payload(run)
    return Payload(values=values, notes=notes)


_OBTAIN = {
    "accuracy": _accuracy,
    "fidelity": _fidelity,
    "layer_sqnr": _layer_sqnr,
    "qparams": _qparams,
    "act_hist": _act_hist,
    "weight_hist": _weight_hist,
    "plot": _plot,
    "sensitivity": _sensitivity,
}


def _distance_rows(prefix: str, stored: dict[str, np.ndarray], obtained: dict[str, np.ndarray], table: ToleranceTable) -> list[Row]:
    rows = []
    for key, label in (("counts", "forward"), ("binned_grads", "gradient")):
        if key not in stored and key not in obtained:
            continue
        metric = f"{prefix}.{label}.distance"
        tolerance, source = table.resolve(metric)
        if key not in stored or key not in obtained or stored[key].shape != obtained[key].shape:
            shapes = (getattr(stored.get(key), "shape", None), getattr(obtained.get(key), "shape", None))
            rows.append(Row(metric, str(shapes[0]), str(shapes[1]), tolerance, source, False, "histogram bins differ"))
            continue
        distance = histogram_distance(np.abs(stored[key]), np.abs(obtained[key]))
        rows.append(Row(metric, 0.0, distance, tolerance, source, tolerance.allows(0.0, distance)))
    return rows
