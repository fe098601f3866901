"""Sensitivity-analysis (SA) hooks: each backward's gradients binned on its forward call's bins.

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
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from eqcore.analysis.gradient_binning import GradientBinner, GradientBins, bin_gradient, gradient_binner
from eqcore.analysis.histograms import GradientHistogram, TensorHistogram
from eqcore.analysis.hooks import (
    ActHistogram,
    ConditionsMet,
    _call_grids,
    _first_tensor,
    _ForwardRecorder,
    _needs_grad,
    _orphaned,
    _Pending,
    _record_failure,
    _Slot,
    activation_quantizers,
)
from eqcore.quant.functional import observe_backward

__all__ = ["add_sensitivity_analysis_hooks"]

logger = logging.getLogger(__name__)


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
    while the chunk and its dY are in cache (see ``eqcore.quant.functional.observe_backward``): the
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
