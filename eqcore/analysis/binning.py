"""Tensor binning: every element of a tensor counted in its bin of a :class:`QuantGrid`.

On the CPU, per-tensor binning runs over cache-sized chunks with a few in-place passes each and
counts into interleaved sub-histograms (long runs of one value, like ReLU zeros, would otherwise
serialise the count). Other devices take the whole-tensor path, which never synchronises with
the host.

The scratch buffers, sub-histogram lanes and index passes here are shared with the gradient
pass (:mod:`eqcore.analysis.gradient_binning`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from eqcore.analysis.grid import _LANES, GridBins, QuantGrid, _Plan, flatten_as, is_channels_last

_CHUNK = 1 << 16
_OVERFLOW = 1e37


def _index_whole(u: torch.Tensor, plan: _Plan, grid: GridBins) -> torch.Tensor:
    """Float bin index of every grid coordinate ``u`` (overwritten); NaN -> nan bin.

    Clamping u first makes infinities finite, so they land in the outermost bins.
    """
    u = torch.clamp(u, min=plan.u_low, max=plan.u_high, out=u)
    r = torch.round(u)
    torch.lerp(r, u, plan.weight, out=u)
    u.clamp_(min=plan.low, max=plan.high)
    u.mul_(grid.bins_per_qbin).add_(plan.const)
    return u.nan_to_num_(nan=float(grid.nan_bin))


_LANE_BASES: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}


def _lane_offsets(size: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Offset of each element's sub-histogram: element i counts in lane i % 4 (cached)."""
    key = (size, length, dtype)
    base = _LANE_BASES.get(key)
    if base is None:
        if len(_LANE_BASES) > 64:
            _LANE_BASES.clear()
        base = _LANE_BASES[key] = (torch.arange(size) % _LANES).mul_(length).to(dtype)
    return base


class _Scratch(threading.local):
    """Per-thread reusable work buffers of the chunked paths (a few MiB at most).

    Reusing them spares every hook call fresh allocations and their page faults; a nested
    user (not expected) gets fresh buffers instead of sharing.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, int, torch.dtype], torch.Tensor] = {}
        self.lane_keys: dict[tuple[int, torch.dtype], tuple[int, float]] = {}  # what "lanes" holds
        self.busy = False

    def get(self, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
        key = (name, size, dtype)
        buffer = self.buffers.get(key)
        if buffer is None:
            if len(self.buffers) > 32:
                self.buffers.clear()
                self.lane_keys.clear()
            buffer = self.buffers[key] = torch.empty(size, dtype=dtype)
        return buffer


_SCRATCH = _Scratch()


def _lanes_plus(scratch: _Scratch, size: int, length: int, const: float, dtype: torch.dtype) -> torch.Tensor:
    """Lane offsets (see :func:`_lane_offsets`) plus ``const``, in the scratch; recomputed only
    when the grid's length or constant changes."""
    lanes = scratch.get("lanes", size, dtype)
    key = (size, dtype)
    if scratch.lane_keys.get(key) != (length, const):
        torch.add(_lane_offsets(size, length, dtype), const, out=lanes)
        scratch.lane_keys[key] = (length, const)
    return lanes


class _ScratchLease:
    """Context manager: the thread's scratch buffers, or fresh ones if they are in use."""

    def __enter__(self) -> _Scratch:
        if _SCRATCH.busy:
            self.owned = False
            return _Scratch()
        _SCRATCH.busy = self.owned = True
        return _SCRATCH

    def __exit__(self, *exc_info: object) -> None:
        if self.owned:
            _SCRATCH.busy = False


def _fold_lanes(counts: torch.Tensor, length: int) -> torch.Tensor:
    return counts.view(_LANES, length).sum(0)


@dataclass
class BinCounts:
    """One call's counts (``grid.n_bins + 1`` entries, the last one NaNs) and extremes.

    ``lows``/``highs`` are (value, grid coordinate u + z) minima/maxima of the finite elements,
    +inf/-inf when there are none. ``fast`` says every element was finite and of moderate size,
    which lets the gradient pass take the chunked path.
    """

    counts: torch.Tensor
    lows: torch.Tensor
    highs: torch.Tensor
    inf_count: torch.Tensor
    numel: int
    fast: bool

    @property
    def value_range(self) -> tuple[float, float]:
        return float(self.lows[0]), float(self.highs[0])


class _ChunkIndexer:
    """Bin indices of a per-tensor CPU tensor, a cache-sized chunk at a time.

    For each chunk: u = x * (1/s), r = round(u) (the quantizer's own operations), then the
    index lane + B * clamp(r + w * (u - r)) + const in three in-place passes, the clamp skipped
    when the chunk lies well inside the histogram. Indices are int32 with the lane offset of
    their sub-histogram added (see :func:`_fold_lanes`), in ``index`` (``batch`` chunks of them).
    """

    def __init__(self, plan: _Plan, grid: GridBins, size: int, batch: int, scratch: _Scratch) -> None:
        self.inv, _, const, self.low, self.high = plan.scalars()
        self.weight = plan.weight
        self.B = grid.bins_per_qbin
        self.length = grid.n_bins + 1
        self.size = size
        self.lane_base = _lane_offsets(size, self.length, torch.int32)
        self.lanes = _lanes_plus(scratch, size, self.length, const, plan.compute)
        self.u = scratch.get("u", size, plan.compute)
        self.r = scratch.get("r", size, plan.compute)
        self.index = scratch.get("index", size * batch, torch.int32)
        # Chunks whose u lies in [safe_low, safe_high] need no clamp.
        self.safe_low, self.safe_high = self.low + 1.0, self.high - 1.0

    def grid(self, xc: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """u = x * (1/s) and r = round(u) of a chunk of m elements (views into scratch)."""
        u, r = (self.u, self.r) if m == self.size else (self.u[:m], self.r[:m])
        torch.mul(xc, self.inv, out=u)
        torch.round(u, out=r)
        return u, r

    def finish(self, u: torch.Tensor, r: torch.Tensor, slot: int, m: int, inside: bool) -> torch.Tensor:
        """Turn (u, r) into lane-offset indices in ``index[slot * size:]``; u is overwritten."""
        index = self.index[slot * self.size : slot * self.size + m]
        index.copy_(_index_values(u, r, u, self.lanes[:m], self.weight, self.B, None if inside else (self.low, self.high)))
        return index


def _index_values(
    u: torch.Tensor,
    r: torch.Tensor,
    out: torch.Tensor,
    lanes: torch.Tensor,
    weight: float,
    B: int,
    clamp: tuple[float, float] | None,
) -> torch.Tensor:
    """lane + B * clamp(r + w * (u - r)) + const (``lanes`` holds lane + const) into ``out``,
    which may be ``u``: truncated to an integer, the lane-offset bin of each element."""
    torch.lerp(r, u, weight, out=out)
    if clamp is not None:
        out.clamp_(*clamp)
    return torch.add(lanes, out, alpha=B, out=out)


_COUNT_BATCH = 4


def _bin_cpu_chunked(
    xf: torch.Tensor, plan: _Plan, grid: GridBins, indices: torch.Tensor | None = None
) -> BinCounts | None:
    """Per-tensor CPU path; None when x holds NaN/inf or huge values (use the robust path).

    ``indices``, when given, receives every element's bin (without lane offsets).
    """
    with _ScratchLease() as scratch:
        return _bin_cpu_chunks(xf, plan, grid, indices, scratch)


def _bin_cpu_chunks(
    xf: torch.Tensor, plan: _Plan, grid: GridBins, indices: torch.Tensor | None, scratch: _Scratch
) -> BinCounts | None:
    n = xf.numel()
    chunker = _ChunkIndexer(plan, grid, min(_CHUNK, n), _COUNT_BATCH, scratch)
    inv, size, length = chunker.inv, chunker.size, chunker.length
    counts = torch.zeros(_LANES * length, dtype=torch.int64)
    low_value, high_value = math.inf, -math.inf
    slot = 0
    for start in range(0, n, size):
        stop = min(start + size, n)
        m = stop - start
        xc = xf[start:stop]
        if xc.dtype != plan.compute:
            xc = xc.to(plan.compute)
        low, high = torch.aminmax(xc)
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)) or max(-low, high) * inv > _OVERFLOW:
            return None
        low_value, high_value = min(low_value, low), max(high_value, high)
        u, r = chunker.grid(xc, m)
        inside = chunker.safe_low <= low * inv and high * inv <= chunker.safe_high
        index = chunker.finish(u, r, slot, m, inside)
        if indices is not None:
            torch.sub(index, chunker.lane_base[:m], out=indices[start:stop])
        slot += 1
        if slot == _COUNT_BATCH or stop == n:
            counts.add_(torch.bincount(chunker.index[: (slot - 1) * size + m], minlength=_LANES * length))
            slot = 0
    zero_point = float(plan.zero_point)
    return BinCounts(
        counts=_fold_lanes(counts, length),
        lows=torch.tensor([low_value, low_value * inv + zero_point], dtype=torch.float64),
        highs=torch.tensor([high_value, high_value * inv + zero_point], dtype=torch.float64),
        inf_count=torch.zeros((), dtype=torch.int64),
        numel=n,
        fast=True,
    )


def _extremes(xc: torch.Tensor, u: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    if xc.numel() == 0:
        inf = torch.full((2,), math.inf, dtype=torch.float64, device=xc.device)
        return inf, -inf
    finite = torch.isfinite(xc)
    grid_u = u + plan.zero_point
    lows = torch.stack(
        [torch.where(finite, xc, math.inf).amin(), torch.where(finite, grid_u, math.inf).amin()]
    )
    highs = torch.stack(
        [torch.where(finite, xc, -math.inf).amax(), torch.where(finite, grid_u, -math.inf).amax()]
    )
    return lows.double(), highs.double()


def _index_robust(x: torch.Tensor, plan: _Plan, grid: GridBins) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int64 index shaped like x, lows, highs) on any device, without host synchronisation."""
    xc = x.detach().to(plan.compute)
    u = torch.mul(xc, plan.inv_scale)
    lows, highs = _extremes(xc, u, plan)
    return _index_whole(u, plan, grid).long(), lows, highs


def bin_tensor(x: torch.Tensor, qgrid: QuantGrid) -> BinCounts:
    """Count every element of ``x`` in its bin of ``qgrid``; never raises on NaN or inf."""
    x = x.detach()
    grid = qgrid.grid
    plan = _Plan.build(x, qgrid)
    if x.numel() and x.device.type == "cpu" and qgrid.ch_axis is None:
        counted = _bin_cpu_chunked(flatten_as(x, is_channels_last(x)), plan, grid)
        if counted is not None:
            return counted
    index, lows, highs = _index_robust(x, plan, grid)
    counts = torch.bincount(index.reshape(-1), minlength=grid.n_bins + 1)
    return BinCounts(
        counts=counts,
        lows=lows,
        highs=highs,
        inf_count=torch.isinf(x).sum(),
        numel=x.numel(),
        fast=False,
    )


def bin_indices(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    grid: GridBins,
    *,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """Histogram bin index (int32, shaped like ``x``) of every element; NaNs get ``grid.nan_bin``.

    ``scale`` and ``zero_point`` have one element (per tensor) or ``x.shape[ch_axis]`` elements.
    The bin of x is the one the fake quantizer rounds it into, at every rounding tie.
    """
    qgrid = QuantGrid.capture(scale, zero_point, grid, ch_axis=ch_axis)
    x = x.detach()
    plan = _Plan.build(x, qgrid)
    if x.numel() and x.device.type == "cpu" and ch_axis is None:
        channels_last = is_channels_last(x)
        flat = torch.empty(x.numel(), dtype=torch.int32)
        if _bin_cpu_chunked(flatten_as(x, channels_last), plan, grid, flat) is not None:
            if channels_last:
                n, c, h, w = x.shape
                return flat.view(n, h, w, c).permute(0, 3, 1, 2)
            return flat.view(x.shape)
    return _index_robust(x, plan, grid)[0].to(torch.int32)


@dataclass(frozen=True)
class ValueScan:
    """x's finite min and max (float units) and whether every element is finite.

    One reduction pass; it decides whether the chunked CPU path applies and gives the counts
    their extremes when they are computed later, with the gradient.
    """

    low: float
    high: float
    finite: bool

    def fast_for(self, plan: _Plan) -> bool:
        return self.finite and max(-self.low, self.high) * float(plan.inv_scale.max()) < _OVERFLOW


def scan_values(x: torch.Tensor) -> ValueScan:
    """Scan ``x`` once (a host sync on accelerators); never raises on NaN, inf or empty x."""
    x = x.detach()
    if x.numel() == 0:
        return ValueScan(math.inf, -math.inf, True)
    low, high = (float(v) for v in torch.aminmax(x))
    if math.isfinite(low) and math.isfinite(high):
        return ValueScan(low, high, True)
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return ValueScan(math.inf, -math.inf, False)
    low, high = (float(v) for v in torch.aminmax(finite))
    return ValueScan(low, high, False)
