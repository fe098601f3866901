"""Quantized tensor histograms (QTH) and sensitivity analysis (SA) through hooks.

Activation hooks sit on fake-quant modules (any ``torch.ao`` ``FakeQuantizeBase``, eqcore's
included) and histogram each module's *input* x on the module's own quantization grid, with the
qparams read at the call (after the module's observer, if on, has set them).

SA pairs every backward with the forward call that produced it: the forward hook snapshots the
call's qparams, scans x (min, max, finite) and registers a hook on that call's output tensor;
when dY arrives, the indices of x are computed once and both x's counts and dY are binned on
them. x itself is what the quantizer saves for its own backward, so nothing per element is
kept beyond that. A module called several times per forward, any number of batches, and
batches of different content all pair correctly. Counts of calls whose backward has not come
yet are settled on any read, and those of graphs dropped without a backward on the next read.
On eqcore's own quantizers (per tensor, on the CPU) the binning runs inside the quantizer's
backward instead of a tensor hook, on the grid coordinates that backward computes anyway while
x and dY are in cache: the same bins, bit for bit, at about a fifth less cost.

Entries keep the seed's attribute names: forward ``data[name]`` is a :class:`TensorHistogram`
(``hist``, ``bin_edges``), backward ``data[name]`` a :class:`GradientHistogram`
(``binned_grads``). Hooks never raise inside a forward or backward pass: NaN/inf are binned
and counted, and any other failure is stored in ``ActHistogram.errors`` under the module name.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from eqcore._torch_ao import FakeQuantizeBase
from eqcore.errors import EQError
from eqcore.analysis.histogram import (
    GradientBinner,
    GradientBins,
    GradientHistogram,
    GridBins,
    HistogramStats,
    QuantGrid,
    TensorHistogram,
    ValueScan,
    bin_gradient,
    bin_tensor,
    gradient_binner,
    resampled_grid,
    scan_values,
)
from eqcore.quant.quantizers import observe_backward

__all__ = [
    "ActHistogram",
    "ModuleSA",
    "SAResult",
    "WeightHistogram",
    "activation_quantizers",
    "add_activation_forward_hooks",
    "add_sensitivity_analysis_hooks",
    "run_sensitivity_analysis",
    "weight_histograms",
]

logger = logging.getLogger(__name__)

ConditionsMet = Callable[[nn.Module, str], bool]
H = TypeVar("H")

_PER_CHANNEL = (
    torch.per_channel_symmetric,
    torch.per_channel_affine,
    torch.per_channel_affine_float_qparams,
)


@dataclass
class ActHistogram(Generic[H]):
    """Histograms gathered by hooks, keyed by module name, and the hooks' handles.

    ``data`` fills on the first call of each hooked module. ``reset()`` removes the hooks and
    clears everything (as in the seed); ``remove_hooks()`` keeps the data. ``errors`` names
    modules whose hook failed for a reason other than NaN/inf (the pass itself went on).
    """

    data: dict[str, H] = field(default_factory=dict)
    hook_handles: dict[str, RemovableHandle] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def remove_hooks(self) -> None:
        for handle in self.hook_handles.values():
            handle.remove()
        self.hook_handles = {}

    def reset(self) -> None:
        self.remove_hooks()
        self.data = {}
        self.errors = {}


def _record_failure(store: ActHistogram, name: str, exc: BaseException) -> None:
    if name not in store.errors:
        logger.warning("histogram hook on %s failed: %s: %s", name, type(exc).__name__, exc)
    store.errors[name] = f"{type(exc).__name__}: {exc}"


def _weight_quantizer_ids(model: nn.Module) -> set[int]:
    return {
        id(module.weight_fake_quant)
        for module in model.modules()
        if isinstance(getattr(module, "weight_fake_quant", None), nn.Module)
    }


def activation_quantizers(
    model: nn.Module, conditions_met: ConditionsMet | None = None
) -> list[tuple[str, nn.Module]]:
    """Fake-quant modules that quantize activations (weight quantizers excluded), in model order.

    ``conditions_met(module, name)`` further selects among them (None: all of them).
    """
    weight_ids = _weight_quantizer_ids(model)
    selected = []
    for name, module in model.named_modules():
        if not isinstance(module, FakeQuantizeBase) or id(module) in weight_ids:
            continue
        if conditions_met is not None and not conditions_met(module, name):
            continue
        selected.append((name, module))
    return selected


def _channel_axis(quantizer: nn.Module, x: torch.Tensor) -> int | None:
    if getattr(quantizer, "qscheme", None) not in _PER_CHANNEL or quantizer.scale.numel() == 1:
        return None
    axis = int(getattr(quantizer, "ch_axis", 0))
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"ch_axis {axis} is out of range for a {x.dim()}-d tensor")
    return axis % x.dim()


def _call_grids(
    quantizer: nn.Module, x: torch.Tensor, bit_res: int | None, cached: GridBins | None
) -> tuple[QuantGrid, QuantGrid]:
    """(histogram grid, quantizer's own grid) of one call, from the module's qparams now.

    They are the same object unless ``bit_res`` resamples the histogram grid; the second one
    gives the quantizer's output for the sensitivity score.
    """
    scale, zero_point = quantizer.scale.detach(), quantizer.zero_point.detach()
    quant_min, quant_max = int(quantizer.quant_min), int(quantizer.quant_max)
    ch_axis = _channel_axis(quantizer, x)
    h_scale, h_zero, h_min, h_max = resampled_grid(scale, zero_point, quant_min, quant_max, bit_res)
    if cached is not None and (cached.quant_min, cached.quant_max) == (h_min, h_max):
        grid = cached
    else:
        grid = GridBins.for_range(h_min, h_max)
    histogram = QuantGrid.capture(h_scale, h_zero, grid, ch_axis=ch_axis)
    if (h_min, h_max) == (quant_min, quant_max):
        return histogram, histogram
    own = QuantGrid.capture(scale, zero_point, GridBins.for_range(quant_min, quant_max), ch_axis=ch_axis)
    return histogram, own


def _first_tensor(inputs: tuple[Any, ...]) -> torch.Tensor | None:
    if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].is_floating_point():
        return inputs[0]
    return None


def _needs_grad(output: Any) -> bool:
    return isinstance(output, torch.Tensor) and output.requires_grad


def _is_registered(handle: RemovableHandle | None) -> bool:
    if handle is None:
        return False
    hooks = handle.hooks_dict_ref()
    return hooks is not None and handle.id in hooks


class _Pending:
    """One SA call, from its forward to its backward.

    Holds the quantizer's input x (which the quantizer saves for its own backward anyway, so
    this costs no memory), its version, the call's grids and a scan of x. The forward counts
    of x are deferred to the backward, which computes the indices once for both; ``settle``
    counts x on its own when the histogram is read first, or the backward never comes.
    """

    __slots__ = ("x", "version", "histogram", "quantizer", "scan", "target", "counted", "__weakref__")

    def __init__(
        self,
        x: torch.Tensor,
        histogram: QuantGrid,
        quantizer: QuantGrid | None,
        target: TensorHistogram | None,
    ) -> None:
        self.x: torch.Tensor | None = x.detach()
        self.version = x._version
        self.histogram = histogram
        self.quantizer = quantizer
        self.scan: ValueScan | None = scan_values(x) if x.device.type == "cpu" else None
        self.target = target
        self.counted = target is None
        if target is not None:
            target.defer(self)

    def settle(self) -> None:
        if self.counted or self.x is None:
            return
        self.counted = True
        self.target.add(bin_tensor(self.x, self.histogram), self.histogram)

    def release(self) -> None:
        self.x = None


def _orphaned(pending: _Pending) -> None:
    """Finalizer of a gradient sink that never fired: its graph was dropped without backward."""
    if not pending.counted and pending.target is not None:
        pending.target.orphan(pending)


class _Slot:
    """Hands one call's binning from the forward recorder to the SA hook of the same call."""

    def __init__(self, score: bool) -> None:
        self.score = score
        self.value: _Pending | None = None
        self.handle: RemovableHandle | None = None

    def wanted(self, output: Any) -> bool:
        return _needs_grad(output) and _is_registered(self.handle)


class _ForwardRecorder:
    """Forward hook: add the quantizer's input to its :class:`TensorHistogram`.

    Calls that an SA hook pairs with a backward are counted in that backward instead.
    """

    def __init__(self, name: str, store: ActHistogram, bit_res: int | None, slot: _Slot | None) -> None:
        self.name = name
        self.store = store
        self.bit_res = bit_res
        self.slot = slot

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        try:
            x = _first_tensor(inputs)
            if x is None:
                return
            hist = self.store.data.get(self.name)
            histogram, own = _call_grids(module, x, self.bit_res, hist.grid if hist is not None else None)
            if hist is None:
                hist = self.store.data[self.name] = TensorHistogram(histogram.grid, histogram.ch_axis)
            elif hist.ch_axis != histogram.ch_axis:
                raise ValueError(f"the channel axis changed between calls ({hist.ch_axis} -> {histogram.ch_axis})")
            hist.settle(orphans_only=True)
            if self.slot is not None and self.slot.wanted(output):
                quantizer = own if self.slot.score else None
                self.slot.value = _Pending(x, histogram, quantizer, hist)
            else:
                hist.add(bin_tensor(x, histogram), histogram)
        except Exception as exc:  # a hook must never break the forward pass
            _record_failure(self.store, self.name, exc)


class _GradientSink:
    """Tensor hook on one call's output: count x and bin dY on the same indices, once."""

    def __init__(self, name: str, store: ActHistogram, grads: GradientHistogram, pending: _Pending) -> None:
        self.name = name
        self.store = store
        self.grads = grads
        self.pending: _Pending | None = pending
        self.finalizer = weakref.finalize(self, _orphaned, pending)

    def __call__(self, grad: torch.Tensor) -> None:
        pending = self._claim()
        if pending is None:
            return
        try:
            self._check(pending)
            self._record(pending, bin_gradient(
                pending.x,
                grad,
                pending.histogram,
                quantizer=pending.quantizer,
                scan=pending.scan,
                count=not pending.counted,
            ), grad)
        except Exception as exc:  # a hook must never break the backward pass
            self._fail(pending, exc)
        finally:
            pending.release()

    def _claim(self) -> _Pending | None:
        pending, self.pending = self.pending, None
        if pending is not None:
            self.finalizer.detach()
        return pending

    @staticmethod
    def _check(pending: _Pending) -> None:
        if pending.x._version != pending.version:
            raise RuntimeError("the quantizer's input was modified in place before the backward pass")

    def _record(self, pending: _Pending, binned: GradientBins, grad: torch.Tensor) -> None:
        if binned.counts is not None:
            pending.counted = True
            pending.target.add(binned.counts, pending.histogram)
        self.grads.add(binned, grad)

    def _fail(self, pending: _Pending, exc: BaseException) -> None:
        _record_failure(self.store, self.name, exc)
        try:
            pending.settle()
        except Exception as settle_exc:
            _record_failure(self.store, self.name, settle_exc)


class _FusedSink(_GradientSink):
    """The SA binning of one call of an eqcore quantizer, done inside the quantizer's backward.

    The backward hands over each chunk's u = x * (1/s) and round(u), which it computes anyway,
    while the chunk and its dY are in cache (see ``eqcore.quant.quantizers.observe_backward``): the
    gradient pass then neither reads x and dY again nor recomputes their grid coordinates. The
    bins are the same, bit for bit, as those of the tensor hook it replaces; where the backward
    offers no chunks (or not the histogram's own grid), it bins dY as that hook would.
    """

    def __init__(self, name: str, store: ActHistogram, grads: GradientHistogram, pending: _Pending) -> None:
        super().__init__(name, store, grads, pending)
        self.active: tuple[_Pending, GradientBinner, torch.Tensor] | None = None

    def begin(self, grad: torch.Tensor, inv: float | None, chunk_size: int) -> Callable[..., None] | None:
        pending = self._claim()
        if pending is None:
            return None
        binner = None
        try:
            self._check(pending)
            if inv is not None:
                binner = gradient_binner(
                    pending.x, pending.histogram, quantizer=pending.quantizer, scan=pending.scan,
                    count=not pending.counted, feed_size=chunk_size,
                )
            if binner is not None and binner.inv == inv:
                self.active = (pending, binner, grad)
                return self._feed
        except Exception as exc:  # a hook must never break the backward pass
            self._fail(pending, exc)
            pending.release()
            return None
        finally:
            if binner is not None and self.active is None:
                binner.close()
        self._standalone(pending, grad)  # the backward's grid is not the histogram's
        return None

    def _feed(self, u: torch.Tensor, r: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, work: torch.Tensor) -> None:
        if self.active is None:
            return
        try:
            self.active[1].feed(u, r, dy, x, work)
        except Exception as exc:
            _record_failure(self.store, self.name, exc)
            self.abort()

    def end(self) -> None:
        if self.active is None:
            return
        pending, binner, grad = self.active
        self.active = None
        try:
            self._record(pending, binner.result(), grad)
        except Exception as exc:
            self._fail(pending, exc)
        finally:
            binner.close()
            pending.release()

    def abort(self) -> None:
        """The backward stopped offering chunks: bin dY from x instead."""
        if self.active is not None:
            pending, binner, grad = self.active
            self.active = None
            binner.close()
            self._standalone(pending, grad)

    def _standalone(self, pending: _Pending, grad: torch.Tensor) -> None:
        self.pending = pending
        self.finalizer = weakref.finalize(self, _orphaned, pending)
        self(grad)


class _GradientPairing:
    """Forward hook (after the recorder): attach a :class:`_GradientSink` to this call's output."""

    def __init__(self, name: str, store: ActHistogram, bit_res: int | None, slot: _Slot) -> None:
        self.name = name
        self.store = store
        self.bit_res = bit_res
        self.slot = slot

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> torch.Tensor | None:
        pending, self.slot.value = self.slot.value, None
        try:
            x = _first_tensor(inputs)
            if x is None or not _needs_grad(output):
                return None
            grads = self.store.data.get(self.name)
            if pending is None:
                histogram, own = _call_grids(module, x, self.bit_res, grads.grid if grads is not None else None)
                pending = _Pending(x, histogram, own if self.slot.score else None, None)
            if grads is None:
                grads = self.store.data[self.name] = GradientHistogram(pending.histogram.grid)
            sink = _FusedSink(self.name, self.store, grads, pending)
            if output is not x and x.device.type == "cpu" and x.is_contiguous() and observe_backward(output, sink):
                return None  # eqcore's quantizer bins dY in its own backward
            sink.finalizer.detach()
            replaced = None
            if output is x:
                # The quantizer passed its input through; hook a view so only this module's
                # share of dX is seen, not the other consumers' of the same tensor.
                output = replaced = output.view_as(output)
            output.register_hook(_GradientSink(self.name, self.store, grads, pending))
            return replaced
        except Exception as exc:  # a hook must never break the forward pass
            _record_failure(self.store, self.name, exc)
            return None


def add_activation_forward_hooks(
    model: nn.Module,
    conditions_met: ConditionsMet | None = None,
    bit_res: int = 8,
) -> ActHistogram[TensorHistogram]:
    """Histogram the input of every selected activation quantizer on its quantization grid.

    ``conditions_met(module, name) -> bool`` selects modules (None: every activation
    quantizer); ``bit_res`` sets the histogram grid's resolution only. Call ``reset()`` on the
    result to remove the hooks.
    """
    store: ActHistogram[TensorHistogram] = ActHistogram()
    for name, module in activation_quantizers(model, conditions_met):
        store.hook_handles[name] = module.register_forward_hook(_ForwardRecorder(name, store, bit_res, None))
    if not store.hook_handles:
        logger.warning("no activation fake-quant module matched; no histogram hooks were added")
    return store


def add_sensitivity_analysis_hooks(
    model: nn.Module,
    conditions_met: ConditionsMet | None = None,
    bit_res: int = 8,
    *,
    score: bool = False,
) -> tuple[ActHistogram[TensorHistogram], ActHistogram[GradientHistogram]]:
    """Forward histograms plus gradients binned on them, as ``(forward, backward)``.

    Run forward and backward (e.g. ``model(x).mean().backward()``) any number of times; each
    backward is paired with the forward call that produced it. With ``score`` the backward
    entries also accumulate the sensitivity sum(dY^2 * (y - x)^2) (a few more passes per
    element). ``reset()`` each result to remove its hooks.
    """
    forward: ActHistogram[TensorHistogram] = ActHistogram()
    backward: ActHistogram[GradientHistogram] = ActHistogram()
    for name, module in activation_quantizers(model, conditions_met):
        slot = _Slot(score)
        forward.hook_handles[name] = module.register_forward_hook(_ForwardRecorder(name, forward, bit_res, slot))
        slot.handle = module.register_forward_hook(_GradientPairing(name, backward, bit_res, slot))
        backward.hook_handles[name] = slot.handle
    if not forward.hook_handles:
        logger.warning("no activation fake-quant module matched; no sensitivity hooks were added")
    return forward, backward


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


def _observer_flag(quantizer: nn.Module) -> bool:
    flag = getattr(quantizer, "static_enabled", None)
    if not isinstance(flag, torch.Tensor):
        flag = quantizer.observer_enabled
    return bool(flag[0])


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
            observers=[(m, _observer_flag(m)) for m in model.modules() if isinstance(m, FakeQuantizeBase)],
        )

    def restore(self) -> None:
        for module, training in self.training:
            module.training = training
        for parameter, grad in self.grads:
            parameter.grad = grad
        for parameter, requires_grad in self.requires_grad:
            parameter.requires_grad_(requires_grad)
        for quantizer, enabled in self.observers:
            if _observer_flag(quantizer) != enabled:
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
