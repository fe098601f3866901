"""Weight histograms: every quantized weight on its quantizer's grid and, with SA, its gradients.

A weight is binned once, as its quantizer sees it (a QAT conv-bn module's weight scaled by its
BatchNorm's factor); gradients of backwards that the caller (or the SA pass) ran are summed on
the same bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from eqcore.analysis.binning import bin_tensor
from eqcore.analysis.histograms import GradientHistogram, HistogramStats, TensorHistogram
from eqcore.analysis.hooks import ConditionsMet, _call_grids
from eqcore.errors import EQError

__all__ = ["WeightHistogram", "weight_histograms"]


@dataclass
class WeightHistogram:
    """A weight tensor on its quantization grid and, with SA, its gradients binned on it.

    Per-channel weights are aggregated on the integer grid (``bin_edges`` in grid units).
    ``score`` is sum(grad^2 * (quantized - w)^2) when gradients were given, else None.
    """

    name: str
    histogram: TensorHistogram
    stats: HistogramStats
    gradients: GradientHistogram | None = None
    grad_stats: HistogramStats | None = None
    score: float | None = None

    @property
    def hist(self) -> np.ndarray:
        return self.histogram.hist

    @property
    def bin_edges(self) -> np.ndarray:
        return self.histogram.bin_edges

    @property
    def binned_grads(self) -> np.ndarray | None:
        return None if self.gradients is None else self.gradients.binned_grads


def _quantizer_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tensor the module's weight quantizer sees, and the per-channel factor from ``weight``.

    Plain modules quantize ``weight`` itself; QAT conv-bn modules quantize the weight scaled by
    gamma / sqrt(running_var + eps), so their histograms show that, and gradients are divided
    by the factor to be gradients with respect to it.
    """
    weight = module.weight.detach()
    bn = getattr(module, "bn", None)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_var is None:
        return weight, None
    factor = 1.0 / torch.sqrt(bn.running_var.detach() + bn.eps)
    if bn.weight is not None:
        factor = factor * bn.weight.detach()
    shape = [1] * weight.dim()
    shape[1 if getattr(module, "transposed", False) else 0] = -1
    factor = factor.reshape(shape)
    return weight * factor, factor


class _WeightProbe:
    """One weight tensor binned once; gradients added after each backward."""

    def __init__(self, name: str, module: nn.Module, bit_res: int | None) -> None:
        self.name = name
        weight, self.factor = _quantizer_weight(module)
        self.weight = weight
        self.qgrid, self.own = _call_grids(module.weight_fake_quant, weight, bit_res, None)
        self.histogram = TensorHistogram(self.qgrid.grid, self.qgrid.ch_axis)
        self.histogram.add(bin_tensor(weight, self.qgrid), self.qgrid)
        self.gradients: GradientHistogram | None = None

    def add_gradient(self, grad: torch.Tensor) -> None:
        if self.factor is not None:
            grad = grad / self.factor
        if self.gradients is None:
            self.gradients = GradientHistogram(self.qgrid.grid)
        self.gradients.add_paired(self.weight, grad, self.qgrid, quantizer=self.own)

    def result(self) -> WeightHistogram:
        hist = self.histogram
        grad_stats = score = None
        if self.gradients is not None:
            grad_stats = self.gradients.stats(zero_point=hist.zero_point, grid_range=hist.grid_range)
            score = self.gradients.score
        return WeightHistogram(
            name=self.name,
            histogram=hist,
            stats=hist.stats(),
            gradients=self.gradients,
            grad_stats=grad_stats,
            score=score,
        )


def _weight_modules(model: nn.Module, conditions_met: ConditionsMet | None) -> list[tuple[str, nn.Module]]:
    selected = []
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_fake_quant", None)
        weight = getattr(module, "weight", None)
        if not isinstance(quantizer, nn.Module) or not hasattr(quantizer, "scale"):
            continue
        if not isinstance(weight, torch.Tensor):
            continue
        if conditions_met is not None and not conditions_met(module, name):
            continue
        selected.append((name, module))
    return selected


def weight_histograms(
    model: nn.Module,
    *,
    conditions_met: ConditionsMet | None = None,
    bit_res: int = 8,
    sensitivity_analysis: bool = False,
) -> dict[str, WeightHistogram]:
    """Histograms of every module's weight (modules with a ``weight_fake_quant``) on its grid.

    With ``sensitivity_analysis`` the weights' ``.grad`` (from a backward the caller ran) is
    binned on the same grid; a missing gradient is an error that says so.
    """
    results = {}
    for name, module in _weight_modules(model, conditions_met):
        grad = module.weight.grad
        if sensitivity_analysis and grad is None:
            raise EQError(
                f"the weight of {name!r} has no gradient: run a backward pass first "
                "(e.g. model(x).mean().backward()) or pass sensitivity_analysis=False"
            )
        probe = _WeightProbe(name, module, bit_res)
        if sensitivity_analysis:
            probe.add_gradient(grad)
        results[name] = probe.result()
    return results
