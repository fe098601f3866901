"""Per-layer sensitivity: which layer breaks a quantized model, and can the SA score tell.

:func:`per_layer_sensitivity` sweeps a calibrated fake-quant model layer by layer (a layer is a
weighted op with its weight and output quantizers, see :mod:`eqcore.analysis.layers`) and
reports, against the float model (the same model with every fake quantizer off), the logits'
SQNR with only that layer quantized (isolated) and with all but that layer quantized
(leave-one-out), the layer's own output error from float inputs (local) and with every
quantizer on (cumulative), and the one-pass gradient score of its quantizers (SA). The Spearman
rank correlation between the SA score and the isolated sweep says whether the cheap score
ranks layers as the expensive sweep does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from eqcore.analysis.layers import QuantizedLayer, find_quantized_layers, weight_quantizer_names
from eqcore.analysis.metrics import Fidelity, fidelity, sqnr
from eqcore.analysis.replay import QuantizerFlags, set_fake_quant
from eqcore.analysis.sa_run import SAResult, _model_device, run_sensitivity_analysis
from eqcore.analysis.sweep import SweepResult, _ErrorSums, run_sweep
from eqcore.errors import EQError
from eqcore.prepare.quantize import PreparedModel, fake_quant_modules

__all__ = ["LayerSensitivity", "SensitivityReport", "per_layer_sensitivity", "spearman"]


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's row. SQNRs are in dB against the float model; ranks count from 1 = most sensitive.

    ``quantizers`` are the fake-quant modules the row toggles: turn exactly these on (every other
    off) and the logits' SQNR is ``isolated_sqnr_db``; turn every other one on and it is
    ``leave_one_out_sqnr_db``. ``local_sqnr_db`` compares the layer's output (after its output
    quantizer) computed from float inputs with its float output; ``cumulative_sqnr_db`` the same
    output with every quantizer on. ``sa_score`` sums the SA scores of its quantizers.
    """

    name: str
    quantizers: tuple[str, ...]
    isolated_sqnr_db: float
    leave_one_out_sqnr_db: float
    local_sqnr_db: float
    cumulative_sqnr_db: float
    sa_score: float
    sweep_rank: int
    sa_rank: int


@dataclass(frozen=True)
class SensitivityReport:
    """Per-layer rows in model order, whole-model fidelities and the SA-vs-sweep rank correlation.

    ``spearman`` is the Spearman correlation between the layers' SA scores and their isolated
    sweep drop (-``isolated_sqnr_db``): near 1, the one-pass SA score ranks layers as the sweep
    does; NaN with fewer than three layers or constant values. ``other_quantizers`` are the
    quantizers of no layer (the model input, adds, pooling), on in ``all_quantizers`` and
    leave-one-out passes, off in isolated ones.
    """

    layers: tuple[LayerSensitivity, ...]
    all_quantizers: Fidelity
    weights_only: Fidelity
    activations_only: Fidelity
    spearman: float
    other_quantizers: tuple[str, ...]
    batches: int
    samples: int

    def layer(self, name: str) -> LayerSensitivity:
        for row in self.layers:
            if row.name == name:
                return row
        raise EQError(f"no layer {name!r} in the sensitivity report; layers are {[r.name for r in self.layers]}")

    def most_sensitive(self, count: int = 5) -> list[LayerSensitivity]:
        """The ``count`` layers with the lowest isolated SQNR, most sensitive first."""
        return sorted(self.layers, key=lambda row: row.sweep_rank)[:count]


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ordered = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and ordered[end + 1] == ordered[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties) over the pairs where neither is NaN."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = ~(np.isnan(x) | np.isnan(y))
    if keep.sum() < 3:
        return math.nan
    rx, ry = _average_ranks(x[keep]), _average_ranks(y[keep])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return math.nan if denominator == 0.0 else float((rx * ry).sum() / denominator)


def _sums_db(sums: _ErrorSums | None) -> float:
    if sums is None or (sums.signal == 0.0 and sums.noise == 0.0):
        return math.nan
    if sums.noise == 0.0:
        return math.inf
    if sums.signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(sums.signal / sums.noise)


def _quantizer_score(sa: SAResult, name: str) -> float:
    if name in sa.activations:
        return float(sa.activations[name].score)
    owner = name[: -len(".weight_fake_quant")] if name.endswith(".weight_fake_quant") else None
    weight = sa.weights.get(owner) if owner is not None else None
    return math.nan if weight is None or weight.score is None else float(weight.score)


def _layer_score(sa: SAResult, layer: QuantizedLayer) -> float:
    scores = [s for s in (_quantizer_score(sa, q) for q in layer.quantizers) if not math.isnan(s)]
    return float(sum(scores)) if scores else math.nan


def _ranks(values: list[float], *, descending: bool) -> list[int]:
    """1-based ranks in sort order (NaN last, ties in model order)."""
    keyed = [(math.isnan(v), -v if descending else v, i) for i, v in enumerate(values)]
    ranks = [0] * len(values)
    for rank, (_, _, index) in enumerate(sorted(keyed), start=1):
        ranks[index] = rank
    return ranks


def _report(layers: list[QuantizedLayer], sweep: SweepResult, sa: SAResult, others: tuple[str, ...]) -> SensitivityReport:
    reference = torch.cat(sweep.float_logits)
    isolated = [sqnr(reference, torch.cat(sweep.isolated[layer.name])) for layer in layers]
    leave_one_out = [
        sqnr(reference, torch.cat(sweep.leave_one_out[layer.name])) if sweep.leave_one_out else math.nan
        for layer in layers
    ]
    scores = [_layer_score(sa, layer) for layer in layers]
    sweep_ranks, sa_ranks = _ranks(isolated, descending=False), _ranks(scores, descending=True)
    rows = tuple(
        LayerSensitivity(
            name=layer.name,
            quantizers=layer.quantizers,
            isolated_sqnr_db=isolated[i],
            leave_one_out_sqnr_db=leave_one_out[i],
            local_sqnr_db=_sums_db(sweep.local.get(layer.probe)) if layer.probe else math.nan,
            cumulative_sqnr_db=_sums_db(sweep.cumulative.get(layer.probe)) if layer.probe else math.nan,
            sa_score=scores[i],
            sweep_rank=sweep_ranks[i],
            sa_rank=sa_ranks[i],
        )
        for i, layer in enumerate(layers)
    )
    configs = {name: fidelity(reference, torch.cat(chunks)) for name, chunks in sweep.config_logits.items()}
    return SensitivityReport(
        layers=rows,
        all_quantizers=configs["all"],
        weights_only=configs["weights_only"],
        activations_only=configs["activations_only"],
        spearman=spearman(scores, [-v for v in isolated]),
        other_quantizers=others,
        batches=sweep.batches,
        samples=sweep.samples,
    )


def per_layer_sensitivity(
    prepared: PreparedModel | nn.Module,
    loader: Iterable[Any],
    *,
    batches: int | None = None,
    sa: SAResult | None = None,
    device: torch.device | str | None = None,
    leave_one_out: bool = True,
    replay: bool = True,
) -> SensitivityReport:
    """Sweep a calibrated fake-quant model layer by layer over ``loader`` (see the module docstring).

    ``prepared`` is a :class:`~eqcore.prepare.quantize.PreparedModel` or any model whose
    quantizers are fake-quant modules (FX or torch.export). ``batches`` limits the loader (None:
    all of it). ``sa`` reuses a sensitivity-analysis pass over the same data; without one, an
    SA pass with every quantizer on runs over the same batches. The qparams are not touched
    (observers are off during the passes), and afterwards every quantizer's fake-quant and
    observer flags and every module's training flag are as they were.
    ``leave_one_out=False`` skips those passes (their SQNRs are then NaN). ``replay=False``
    runs every per-layer pass as a full forward instead of re-running only what the toggle
    changes (same numbers, about twice the time; for graphs whose ops have side effects).
    """
    if batches is not None and batches < 1:
        raise EQError(f"per_layer_sensitivity: batches must be at least 1, got {batches}")
    model = prepared.model if isinstance(prepared, PreparedModel) else prepared
    quantizers = fake_quant_modules(model)
    layers = find_quantized_layers(model)
    if not layers:
        raise EQError(
            f"{type(model).__name__} has fake quantizers but no quantized conv/linear layer to sweep; "
            "prepare it with a recipe that quantizes its weighted layers"
        )
    weights = weight_quantizer_names(model, layers)
    in_layers = {q for layer in layers for q in layer.quantizers}
    others = tuple(name for name in quantizers if name not in in_layers)
    device = torch.device(device) if device is not None else _model_device(model)
    flags = QuantizerFlags.capture(model)
    try:
        flags.freeze()
        sweep = run_sweep(
            model, quantizers, layers, weights, loader, batches=batches, device=device,
            leave_one_out=leave_one_out, replay=replay,
        )
        if sweep.batches == 0:
            raise EQError("per_layer_sensitivity: the loader gave no batches; pass a loader with at least one batch")
        if sa is None:
            set_fake_quant(quantizers, quantizers)
            sa = run_sensitivity_analysis(model, loader, batches=sweep.batches, bit_res=None, device=device)
    finally:
        flags.restore()
    return _report(layers, sweep, sa, others)
