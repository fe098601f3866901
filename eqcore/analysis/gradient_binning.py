"""Gradient binning: a gradient summed into the bins of the forward value it belongs to.

The gradient pass sums a gradient and counts its element in one scatter-add of complex weights
(real part: the gradient, imaginary part: 1), into a few rows that separate threads fill.
Nothing per element is allocated: gradients are binned by computing the indices from the
forward value when the gradient arrives (:func:`bin_gradient`), which can count that value in
the same pass. Other devices take the whole-tensor path of :mod:`eqcore.analysis.binning`,
which never synchronises with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eqcore.analysis.binning import (
    _CHUNK,
    _COUNT_BATCH,
    BinCounts,
    ValueScan,
    _fold_lanes,
    _index_robust,
    _index_values,
    _lanes_plus,
    _Scratch,
    _ScratchLease,
    scan_values,
)
from eqcore.analysis.grid import _LANES, QuantGrid, _Plan, flatten_as, is_channels_last

_ROWS = 4
"""Rows of sub-histograms the gradient pass scatter-adds into: scatter_add_ counts rows on
separate intra-op threads (torch.bincount is single-threaded). A fixed number, so the float
sums do not depend on the machine's thread count."""


def _weight_pairs(scratch: _Scratch, size: int) -> torch.Tensor:
    """complex128 work buffer whose imaginary parts are all 1 (the real parts are overwritten):
    scatter-adding it sums a weight (real) and counts an element (imaginary) in one pass."""
    key = ("pairs", size, torch.complex128)
    fresh = key not in scratch.buffers
    pairs = scratch.get(*key)
    if fresh:
        torch.view_as_real(pairs)[:, 1].fill_(1.0)
    return pairs


@dataclass
class GradientBins:
    """One backward's float64 per-bin gradient sums, optional score and forward counts."""

    sums: torch.Tensor
    score: torch.Tensor | None
    counts: BinCounts | None = None


def _score_terms(
    x: torch.Tensor, grad: torch.Tensor, quantizer: QuantGrid
) -> torch.Tensor:
    """sum(grad^2 * (quantized - x)^2) over the elements whose forward value is finite."""
    xd = x.detach().double()
    term = (quantizer.quantize(x).double() - xd).mul_(grad.detach().double())
    term = torch.where(torch.isfinite(xd), term, 0.0)
    return torch.dot(term.reshape(-1), term.reshape(-1))


_SCATTER = _CHUNK * _COUNT_BATCH
"""Elements per scatter-add of the gradient pass: fixed, so the float sums do not depend on the
sizes the binner is fed in."""


class GradientBinner:
    """One call's per-tensor CPU gradient binning (finite x), fed chunk by chunk.

    ``feed`` takes the next elements' grid coordinate u = x * (1/s) and r = round(u) with their
    gradient, as the fake quantizer computes them, and modifies none of them: the standalone pass
    (:func:`bin_gradient`) computes them from x, and eqcore's own quantizer hands over the ones its
    backward computes anyway (see ``eqcore.quant.kernels``). Indices and weights are scatter-added
    every ``_SCATTER`` elements and score terms summed per ``_CHUNK`` elements, so any feed size
    dividing ``_SCATTER`` gives the same sums bit for bit. ``scan`` lets clamps that cannot bite be
    skipped.
    """

    def __init__(
        self,
        n: int,
        plan: _Plan,
        qgrid: QuantGrid,
        quantizer: QuantGrid | None,
        scan: ValueScan,
        count: bool,
        scratch: _Scratch,
        feed_size: int,
        lease: _ScratchLease | None = None,
    ) -> None:
        grid = qgrid.grid
        self.lease = lease
        self.n, self.plan, self.scan, self.count = n, plan, scan, count
        self.inv, _, const, self.low, self.high = plan.scalars()
        self.weight, self.B, self.length = plan.weight, grid.bins_per_qbin, grid.n_bins + 1
        size = min(_SCATTER, n)
        self.index = scratch.get("index64", size, torch.int64)
        self.pairs = _weight_pairs(scratch, size)
        self.real = torch.view_as_real(self.pairs)[:, 0]
        feed_size = min(feed_size, size)
        self.lanes = _lanes_plus(scratch, feed_size, self.length, const, plan.compute)
        self.scratch, self.feed_size = scratch, feed_size
        # Scratch too (zeroed here): a fresh 0.7 MiB per call would cost its page faults.
        self.accumulated = scratch.get("accumulated", _ROWS * _LANES * self.length, torch.complex128)
        self.accumulated = self.accumulated.view(_ROWS, _LANES * self.length).zero_()
        self.u_low, self.u_high = scan.low * self.inv, scan.high * self.inv
        self.inside = self.low + 1.0 <= self.u_low and self.u_high <= self.high - 1.0
        self.filled = 0
        self.quantizer = quantizer
        if quantizer is not None:
            self.shared = quantizer.same_qparams(qgrid)
            q_plan = plan if self.shared else _Plan.build(torch.empty(0, dtype=plan.compute), quantizer)
            self.q_inv, q_zero = float(q_plan.inv_scale), float(q_plan.zero_point)
            self.q_low, self.q_high = quantizer.grid.quant_min - q_zero, quantizer.grid.quant_max - q_zero
            self.unclamped = self.q_low <= scan.low * self.q_inv and scan.high * self.q_inv <= self.q_high
            self.error = scratch.get("error", feed_size, plan.compute)
            self.partial: list[torch.Tensor] = []

    def feed(self, u: torch.Tensor, r: torch.Tensor, gc: torch.Tensor, xc: torch.Tensor, work: torch.Tensor | None = None) -> None:
        """Bin the next ``u.numel()`` elements: flat u, r, gradient and x (none is modified).

        ``work`` (as many elements, the caller's free scratch) takes the index values; without
        it the binner's own buffer does.
        """
        m = u.numel()
        if self.quantizer is not None:
            # (quantized - x) / s in grid units: clamp(round(u)) - u.
            e = self.error[:m]
            if not self.shared:
                torch.mul(xc.to(self.plan.compute), self.q_inv, out=e)
                e.sub_(torch.round(e).clamp_(self.q_low, self.q_high)).neg_()
            elif self.unclamped:
                torch.sub(r, u, out=e)
            else:
                torch.clamp(r, self.q_low, self.q_high, out=e)
                e.sub_(u)
            e.mul_(gc)
            for start in range(0, m, _CHUNK):
                part = e[start : start + _CHUNK]
                self.partial.append(torch.dot(part, part))
        if work is None:  # u and r stay as they are: the quantizer's backward goes on with them
            work = self.scratch.get("index_values", self.feed_size, self.plan.compute)[:m]
        clamp = None if self.inside else (self.low, self.high)
        self.index[self.filled : self.filled + m].copy_(_index_values(u, r, work, self.lanes[:m], self.weight, self.B, clamp))
        self.real[self.filled : self.filled + m].copy_(gc)
        self.filled += m
        if self.filled == self.index.numel():
            self._flush()

    def _flush(self) -> None:
        if self.filled:
            _scatter_rows(self.accumulated, self.index[: self.filled], self.pairs[: self.filled])
            self.filled = 0

    def close(self) -> None:
        """Hand the scratch buffers back (done by :meth:`result`)."""
        if self.lease is not None:
            self.lease.__exit__()
            self.lease = None

    def result(self) -> GradientBins:
        self._flush()
        totals = self.accumulated.sum(0)  # before the scratch it lives in is handed back
        self.close()
        score = None
        if self.quantizer is not None:
            # The error was in grid units; scale it back once.
            terms = torch.stack(self.partial).double().sum() if self.partial else torch.zeros((), dtype=torch.float64)
            score = terms * float(self.quantizer.scale) ** 2
        counted = None
        if self.count:
            zero_point = float(self.plan.zero_point)
            counted = BinCounts(
                counts=_fold_lanes(totals.imag.round().long(), self.length),
                lows=torch.tensor([self.scan.low, self.u_low + zero_point], dtype=torch.float64),
                highs=torch.tensor([self.scan.high, self.u_high + zero_point], dtype=torch.float64),
                inf_count=torch.zeros((), dtype=torch.int64),
                numel=self.n,
                fast=True,
            )
        return GradientBins(_fold_lanes(totals.real.contiguous(), self.length), score, counted)


def gradient_binner(
    x: torch.Tensor,
    qgrid: QuantGrid,
    *,
    quantizer: QuantGrid | None = None,
    scan: ValueScan | None = None,
    count: bool = False,
    scratch: _Scratch | None = None,
    feed_size: int = _CHUNK,
    plan: _Plan | None = None,
) -> GradientBinner | None:
    """A :class:`GradientBinner` for ``x``'s gradient, or None where the chunked path does not
    apply (not on the CPU, per channel, non-finite or huge values, a feed size that is not a
    multiple of ``_CHUNK`` dividing ``_SCATTER``): use :func:`bin_gradient` then. Without
    ``scratch`` the binner leases the thread's buffers until :meth:`GradientBinner.result` or
    :meth:`GradientBinner.close`. ``plan`` is ``_Plan.build(x, qgrid)`` where the caller has it.
    """
    x = x.detach()
    per_tensor = qgrid.ch_axis is None and (quantizer is None or quantizer.ch_axis is None)
    if not (x.numel() and x.device.type == "cpu" and per_tensor and feed_size % _CHUNK == 0 and _SCATTER % feed_size == 0):
        return None
    plan = plan if plan is not None else _Plan.build(x, qgrid)
    scan = scan if scan is not None else scan_values(x)
    if not scan.fast_for(plan):
        return None
    lease = None
    if scratch is None:
        lease = _ScratchLease()
        scratch = lease.__enter__()
    try:
        return GradientBinner(x.numel(), plan, qgrid, quantizer, scan, count, scratch, feed_size, lease)
    except BaseException:
        if lease is not None:
            lease.__exit__()
        raise


def _bin_gradient_chunked(binner: GradientBinner, xf: torch.Tensor, gf: torch.Tensor, scratch: _Scratch) -> GradientBins:
    """The standalone gradient pass: u and r of each ``_CHUNK`` of x, fed to ``binner``.

    This is the hot loop of a sensitivity pass, so it works on reused buffers and keeps
    Python work per chunk to the op calls themselves.
    """
    n = xf.numel()
    size = min(_CHUNK, n)
    u_buffer, r_buffer = scratch.get("u", size, binner.plan.compute), scratch.get("r", size, binner.plan.compute)
    for start in range(0, n, size):
        stop = min(start + size, n)
        xc, gc = xf[start:stop], gf[start:stop]
        if xc.dtype != binner.plan.compute:
            xc = xc.to(binner.plan.compute)
        u, r = u_buffer[: stop - start], r_buffer[: stop - start]
        torch.mul(xc, binner.inv, out=u)
        torch.round(u, out=r)
        binner.feed(u, r, gc, xc, work=u)  # u is this loop's own: the index values may replace it
    return binner.result()


def _scatter_rows(accumulated: torch.Tensor, index: torch.Tensor, pairs: torch.Tensor) -> None:
    """Scatter-add ``pairs`` at ``index``: equal consecutive blocks go to the rows of
    ``accumulated`` (counted in parallel, each by one thread, so the result is deterministic),
    what does not divide evenly to row 0."""
    rows = accumulated.shape[0]
    even = index.numel() - index.numel() % rows
    if even:
        accumulated.scatter_add_(1, index[:even].view(rows, -1), pairs[:even].view(rows, -1))
    if even < index.numel():
        accumulated[0].scatter_add_(0, index[even:], pairs[even:])


def bin_gradient(
    x: torch.Tensor,
    grad: torch.Tensor,
    qgrid: QuantGrid,
    *,
    quantizer: QuantGrid | None = None,
    scan: ValueScan | None = None,
    count: bool = False,
) -> GradientBins:
    """Sum ``grad`` into the bins of the forward value ``x`` it belongs to (float64).

    With ``quantizer`` (the module's actual qparams; usually ``qgrid`` itself) also returns the
    sensitivity score sum(grad^2 * (quantized - x)^2) over the finite elements of x; with
    ``count`` also the counts of x on the same indices (what :func:`bin_tensor` would give).
    ``scan`` (from :func:`scan_values` on the same x) saves scanning x again.
    """
    x, grad = x.detach(), grad.detach()
    if x.shape != grad.shape:
        raise ValueError(
            f"gradient of shape {tuple(grad.shape)} does not belong to a forward value of shape {tuple(x.shape)}"
        )
    grid = qgrid.grid
    plan = _Plan.build(x, qgrid)
    with _ScratchLease() as scratch:
        binner = gradient_binner(x, qgrid, quantizer=quantizer, scan=scan, count=count, scratch=scratch, plan=plan)
        if binner is not None:
            channels_last = is_channels_last(x)
            return _bin_gradient_chunked(binner, flatten_as(x, channels_last), flatten_as(grad, channels_last), scratch)
    index, lows, highs = _index_robust(x, plan, grid)
    index = index.reshape(-1)
    sums = torch.bincount(index, weights=grad.reshape(-1).double(), minlength=grid.n_bins + 1)
    score = _score_terms(x, grad, quantizer) if quantizer is not None else None
    counted = None
    if count:
        counted = BinCounts(
            counts=torch.bincount(index, minlength=grid.n_bins + 1),
            lows=lows,
            highs=highs,
            inf_count=torch.isinf(x).sum(),
            numel=x.numel(),
            fast=False,
        )
    return GradientBins(sums, score, counted)
