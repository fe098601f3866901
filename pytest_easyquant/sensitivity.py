"""The ``sensitivity`` check of a generated suite and the mixed-precision suggestion.

The check stores the per-layer sweep of :func:`eqcore.per_layer_sensitivity` (isolated,
leave-one-out, local and cumulative SQNR, SA score, the quantizers each row toggles) and the
whole-model fidelities, and adds summary lines: the five most sensitive layers, whether the SA
score ranks layers like the sweep, and with ``--eq-mixed-precision LOW:HIGH`` the measured
suggestion. torch and eqcore are imported only when a run needs them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["MixedPrecisionOption", "parse_mixed_precision", "sensitivity_payload", "summary_lines"]

SUMMARY_LAYERS = 5
_TARGET = re.compile(r"^(sqnr|top1)=([0-9]*\.?[0-9]+)$")


@dataclass(frozen=True)
class MixedPrecisionOption:
    """``LOW:HIGH[:sqnr=<dB>|:top1=<share>]``: the recipes and the target (default SQNR within 1 dB)."""

    low: str
    high: str
    sqnr_within_db: float | None = 1.0
    min_top1_agreement: float | None = None


def parse_mixed_precision(text: str) -> MixedPrecisionOption:
    """The option's value; ValueError saying what is expected."""
    parts = text.split(":")
    expected = "expects LOW:HIGH recipes, e.g. w4a8:w8a8, optionally :sqnr=<dB> or :top1=<share>"
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ValueError(f"{expected}; got {text!r}")
    if len(parts) == 2:
        return MixedPrecisionOption(parts[0], parts[1])
    match = _TARGET.match(parts[2])
    if match is None:
        raise ValueError(f"{expected}; got target {parts[2]!r}")
    value = float(match.group(2))
    if match.group(1) == "sqnr":
        return MixedPrecisionOption(parts[0], parts[1], sqnr_within_db=value)
    if value > 1:
        raise ValueError(f"{expected}; top1 is a share in [0, 1], got {value:g}")
    return MixedPrecisionOption(parts[0], parts[1], sqnr_within_db=None, min_top1_agreement=value)


def resolve_mixed_recipes(text: str | None, registry: Any) -> tuple[Any, Any] | None:
    """(low, high) Recipes of the option; EQError naming the option for an unknown recipe."""
    if not text:
        return None
    from eqcore.errors import EQError

    option = parse_mixed_precision(text)
    try:
        return registry.recipe(option.low), registry.recipe(option.high)
    except EQError as exc:
        raise EQError(f"--eq-mixed-precision {text}: {exc}") from None


def sweep(run: Any) -> Any:
    """The run's SensitivityReport over the evaluation data.

    The SA scores must come from the same data as the sweep to compare their rankings: the run's
    SA pass is reused when it covered every evaluation batch, else the report runs its own.
    """
    from eqcore.analysis.sensitivity import per_layer_sensitivity

    plan = run.plan
    sa = run.sa if run.sa.batches >= len(plan.loaders.eval) else None
    return per_layer_sensitivity(plan.prepared, plan.loaders.eval, sa=sa, device=run.request.device)


def suggest(run: Any) -> Any:
    """The MixedPrecisionSuggestion of ``--eq-mixed-precision`` (None without it)."""
    if not run.request.mixed_precision or run.plan.mixed_recipes is None:
        return None
    from eqcore.analysis.mixed_precision import MixedPrecisionTarget, suggest_mixed_precision

    option = parse_mixed_precision(run.request.mixed_precision)
    low, high = run.plan.mixed_recipes
    plan = run.plan
    return suggest_mixed_precision(
        plan.zoo.model,
        low,
        high,
        plan.loaders.eval,
        target=MixedPrecisionTarget(option.sqnr_within_db, option.min_top1_agreement),
        calib_loader=plan.loaders.calib,
        example_inputs=tuple(t.to(run.request.device) for t in plan.zoo.example_inputs()),
        device=run.request.device,
        report=run.sensitivity if low.name == plan.recipe.name else None,
        cle=run.request.cle,
        backend=plan.backend,  # the backend that prepared this run's model
    )


def _fidelity_values(fid: Any) -> dict[str, float]:
    return {"sqnr_db": float(fid.sqnr_db), "top1_agreement": float(fid.top1_agreement)}


def sensitivity_values(report: Any) -> dict[str, Any]:
    """The stored values: whole-model fidelities, the rank correlation and one block per layer."""
    return {
        "fidelity": {
            "all": _fidelity_values(report.all_quantizers),
            "weights_only": _fidelity_values(report.weights_only),
            "activations_only": _fidelity_values(report.activations_only),
        },
        "spearman_sa_vs_isolated": float(report.spearman),
        "layers": {
            row.name: {
                "quantizers": list(row.quantizers),
                "isolated_sqnr_db": float(row.isolated_sqnr_db),
                "leave_one_out_sqnr_db": float(row.leave_one_out_sqnr_db),
                "local_sqnr_db": float(row.local_sqnr_db),
                "cumulative_sqnr_db": float(row.cumulative_sqnr_db),
                "sa_score": float(row.sa_score),
            }
            for row in report.layers
        },
    }


def _db(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else ("inf" if value > 0 else "n/a" if math.isnan(value) else "-inf")


def summary_lines(report: Any) -> list[str]:
    """The five most sensitive layers, the SA-vs-sweep correlation and the whole-model SQNRs."""
    rows = report.most_sensitive(SUMMARY_LAYERS)
    width = max([len("layer")] + [len(row.name) for row in rows])
    lines = [
        f"most sensitive layers (logits SQNR dB vs float; isolated = only this layer quantized, "
        f"leave-one-out = all but this layer):",
        f"  {'layer'.ljust(width)}  isolated  leave-one-out  local  cumulative  SA rank",
    ]
    for row in rows:
        lines.append(
            f"  {row.name.ljust(width)}  {_db(row.isolated_sqnr_db):>8}  {_db(row.leave_one_out_sqnr_db):>13}  "
            f"{_db(row.local_sqnr_db):>5}  {_db(row.cumulative_sqnr_db):>10}  {row.sa_rank:>7}"
        )
    rho = "n/a" if math.isnan(report.spearman) else f"{report.spearman:.2f}"
    lines.append(
        f"SA score vs isolated sweep: Spearman {rho} over {len(report.layers)} layers "
        "(1 = the one-pass SA score ranks layers as the sweep does)"
    )
    lines.append(
        f"logits SQNR: weights only {_db(report.weights_only.sqnr_db)} dB, activations only "
        f"{_db(report.activations_only.sqnr_db)} dB, all {_db(report.all_quantizers.sqnr_db)} dB"
    )
    return lines


def mixed_precision_lines(text: str, suggestion: Any) -> list[str]:
    option = parse_mixed_precision(text)
    low, high = option.low, option.high
    layers = ", ".join(suggestion.high_layers) or "none"
    verdict = "meets" if suggestion.met else "misses"
    return [
        f"mixed precision {text}: {len(suggestion.high_layers)} of {len(suggestion.order)} layers at {high} "
        f"-> measured logits SQNR {_db(suggestion.fidelity.sqnr_db)} dB, top-1 agreement "
        f"{suggestion.fidelity.top1_agreement:.3f} ({verdict} the target: {suggestion.target.describe(high)}; "
        f"all {low} {_db(suggestion.all_low.sqnr_db)} dB, all {high} {_db(suggestion.all_high.sqnr_db)} dB)",
        f"  layers at {high}: {layers}",
    ]


def sensitivity_payload(run: Any) -> tuple[dict[str, Any], list[str]]:
    """(stored values, summary lines) of the ``sensitivity`` check."""
    report = run.sensitivity
    notes = summary_lines(report)
    if run.request.mixed_precision:
        from eqcore.errors import EQError

        try:
            notes += mixed_precision_lines(run.request.mixed_precision, run.mixed_precision)
        except Exception as exc:  # noqa: BLE001 - the suggestion is advice: report it, keep the check
            reason = str(exc) if isinstance(exc, EQError) else f"{type(exc).__name__}: {exc}"
            notes.append(f"mixed precision {run.request.mixed_precision} failed: {reason}")
    return sensitivity_values(report), notes
