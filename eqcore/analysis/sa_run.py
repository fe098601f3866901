"""The sensitivity-analysis pass: QTH and SA of every quantizer over a few batches of data.

:func:`run_sensitivity_analysis` runs the batches forward and backward with the SA hooks and the
weight probes in place, puts the model back exactly as it was, and gathers what was measured
per module (:class:`ModuleSA`) into an :class:`SAResult`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from eqcore._torch_ao import FakeQuantizeBase
from eqcore.analysis.histograms import GradientHistogram, HistogramStats, TensorHistogram
from eqcore.analysis.hooks import ActHistogram, ConditionsMet
from eqcore.analysis.sa_hooks import add_sensitivity_analysis_hooks
from eqcore.analysis.weights import WeightHistogram, _weight_modules, _WeightProbe
from eqcore.errors import EQError
from eqcore.quant.toggles import observer_is_on

__all__ = ["ModuleSA", "SAResult", "run_sensitivity_analysis"]

logger = logging.getLogger(__name__)


@dataclass
class ModuleSA:
    """Sensitivity analysis of one activation quantizer over a pass.

    ``histogram`` (forward values) and ``gradients`` (dY summed on the same bins) with their
    statistics; ``score`` is sum(dY^2 * (y - x)^2) over every element and batch. ``producer``
    names the graph node feeding the quantizer when the model is an FX GraphModule.
    """

    name: str
    histogram: TensorHistogram
    gradients: GradientHistogram
    stats: HistogramStats
    grad_stats: HistogramStats
    score: float
    producer: str | None = None

    @property
    def hist(self) -> np.ndarray:
        return self.histogram.hist

    @property
    def bin_edges(self) -> np.ndarray:
        return self.histogram.bin_edges

    @property
    def binned_grads(self) -> np.ndarray:
        return self.gradients.binned_grads

    @property
    def has_nonfinite(self) -> bool:
        return self.stats.has_nonfinite or self.grad_stats.has_nonfinite


@dataclass
class SAResult:
    """Everything one sensitivity-analysis pass measured, keyed by module name.

    ``nonfinite_modules`` lists (in model order) the modules whose values or gradients held
    NaN/inf; ``errors`` any hook failure, by module name.
    """

    activations: dict[str, ModuleSA]
    weights: dict[str, WeightHistogram]
    batches: int
    bit_res: int
    nonfinite_modules: list[str]
    errors: dict[str, str]


def _producers(model: nn.Module) -> dict[str, str]:
    graph = getattr(model, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return {}
    producers = {}
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        source = node.args[0]
        producers[str(node.target)] = str(source.target) if source.op == "call_module" else source.name
    return producers


@dataclass
class _ModelState:
    """What a pass changes on the model, captured to be put back afterwards."""

    training: list[tuple[nn.Module, bool]]
    grads: list[tuple[nn.Parameter, torch.Tensor | None]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    observers: list[tuple[nn.Module, bool]]

    @classmethod
    def capture(cls, model: nn.Module) -> _ModelState:
        params = list(model.parameters())
        return cls(
            training=[(m, m.training) for m in model.modules()],
            grads=[(p, p.grad) for p in params],
            requires_grad=[(p, p.requires_grad) for p in params],
            observers=[(m, observer_is_on(m)) for m in model.modules() if isinstance(m, FakeQuantizeBase)],
        )

    def restore(self) -> None:
        for module, training in self.training:
            module.training = training
        for parameter, grad in self.grads:
            parameter.grad = grad
        for parameter, requires_grad in self.requires_grad:
            parameter.requires_grad_(requires_grad)
        for quantizer, enabled in self.observers:
            if observer_is_on(quantizer) != enabled:
                quantizer.enable_observer(enabled)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _split_batch(batch: Any, device: torch.device) -> tuple[tuple[torch.Tensor, ...], Any]:
    """(model inputs, target) from a loader batch: a tensor, or (inputs, target, ...).

    Float inputs are made to require grad, so the graph reaches the input quantizer too (its
    qparams usually do not require grad once calibrated).
    """
    if isinstance(batch, torch.Tensor):
        inputs, target = (batch,), None
    elif isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        inputs = (first,) if isinstance(first, torch.Tensor) else tuple(first)
        target = batch[1] if len(batch) > 1 else None
    else:
        raise EQError(
            f"a loader batch must be a tensor or a (inputs, target) sequence, got {type(batch).__name__}"
        )
    moved = []
    for tensor in inputs:
        if not isinstance(tensor, torch.Tensor):
            raise EQError(f"model inputs from the loader must be tensors, got {type(tensor).__name__}")
        tensor = tensor.to(device)
        if tensor.is_floating_point():
            tensor = tensor.detach().requires_grad_(True)
        moved.append(tensor)
    if isinstance(target, torch.Tensor):
        target = target.to(device)
    return tuple(moved), target


def _loss(output: Any, target: Any, loss_fn: Callable[[Any, Any], torch.Tensor] | None) -> torch.Tensor:
    if loss_fn is not None:
        return loss_fn(output, target)
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        raise EQError(
            f"the model returned {type(output).__name__}, not a float tensor; pass "
            "loss_fn=lambda output, target: ... to reduce it to a scalar"
        )
    return output.mean()


def run_sensitivity_analysis(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    batches: int = 1,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    conditions_met: ConditionsMet | None = None,
    bit_res: int = 8,
    weights: bool = True,
    device: torch.device | str | None = None,
    freeze_qparams: bool = True,
) -> SAResult:
    """Run ``batches`` batches forward and backward and gather QTH + SA for every quantizer.

    The loss is ``output.mean()`` (the seed's SA) or ``loss_fn(output, target)``. Batches are
    tensors or ``(inputs, target)`` pairs, moved to ``device`` (default: the model's). The model
    runs in eval mode with its observers off (``freeze_qparams``), so the pass cannot move the
    qparams it analyses. Afterwards no hook is left installed, and train/eval flags, observer
    flags, ``requires_grad`` and the parameters' ``.grad`` (set aside during the pass) are
    exactly as before.
    """
    if batches < 1:
        raise EQError(f"batches must be at least 1, got {batches}")
    device = torch.device(device) if device is not None else _model_device(model)
    state = _ModelState.capture(model)
    forward = backward = None
    probes: dict[str, _WeightProbe] = {}
    seen = 0
    try:
        model.eval()
        for parameter, _ in state.grads:
            parameter.grad = None
        if freeze_qparams:
            for quantizer, enabled in state.observers:
                if enabled:
                    quantizer.enable_observer(False)
        weight_modules = _weight_modules(model, conditions_met) if weights else []
        for _, module in weight_modules:
            module.weight.requires_grad_(True)
        forward, backward = add_sensitivity_analysis_hooks(
            model, conditions_met=conditions_met, bit_res=bit_res, score=True
        )
        for batch in loader:
            if seen >= batches:
                break
            inputs, target = _split_batch(batch, device)
            with torch.enable_grad():
                output = model(*inputs)
                _loss(output, target, loss_fn).backward()
            del output
            for name, module in weight_modules:
                if name not in probes:
                    probes[name] = _WeightProbe(name, module, bit_res)
                if module.weight.grad is not None:
                    probes[name].add_gradient(module.weight.grad)
            for parameter, _ in state.grads:
                parameter.grad = None
            seen += 1
    finally:
        if forward is not None:
            forward.remove_hooks()
            backward.remove_hooks()
        state.restore()
    if seen == 0:
        raise EQError("the loader gave no batches; pass a loader with at least one batch")
    return _collect(model, forward, backward, probes, seen, bit_res)


def _collect(
    model: nn.Module,
    forward: ActHistogram[TensorHistogram],
    backward: ActHistogram[GradientHistogram],
    probes: dict[str, _WeightProbe],
    seen: int,
    bit_res: int,
) -> SAResult:
    producers = _producers(model)
    activations = {}
    for name, hist in forward.data.items():
        grads = backward.data.get(name) or GradientHistogram(hist.grid)
        activations[name] = ModuleSA(
            name=name,
            histogram=hist,
            gradients=grads,
            stats=hist.stats(),
            grad_stats=grads.stats(zero_point=hist.zero_point, grid_range=hist.grid_range),
            score=grads.score if grads.calls else 0.0,
            producer=producers.get(name),
        )
    weight_results = {name: probe.result() for name, probe in probes.items()}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    nonfinite = [name for name, sa in activations.items() if sa.has_nonfinite]
    nonfinite += [
        name
        for name, w in weight_results.items()
        if w.stats.has_nonfinite or (w.grad_stats is not None and w.grad_stats.has_nonfinite)
    ]
    nonfinite.sort(key=lambda name: order.get(name, len(order)))
    errors = {**forward.errors, **backward.errors}
    for name, message in errors.items():
        logger.warning("sensitivity analysis: hook on %s failed: %s", name, message)
    return SAResult(
        activations=activations,
        weights=weight_results,
        batches=seen,
        bit_res=bit_res,
        nonfinite_modules=nonfinite,
        errors=errors,
    )
