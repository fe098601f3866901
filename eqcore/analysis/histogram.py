"""Grid-aligned histograms: where a tensor's elements sit on its quantization grid.

Pure tensor math on the tensor's own device. A value x with scale s and zero point z has the
grid coordinate u = x * (1/s) (the product the quantizer itself rounds), lands in quantization
bin q = round_half_even(u) + z, and sits at e = u - round(u) in [-1/2, 1/2] inside that bin.
Each quantization bin is split into ``bins_per_qbin`` histogram bins by e, so an element is in
exactly the quantization bin the fake quantizer puts it in, ties included, and the middle
histogram bin of each quantization bin holds its centroid. (e is resolved to about 5e-4 of a
bin: the split is shrunk by that much so float rounding can never push an element across a
quantization-bin edge.) ``margin_qbins`` quantization bins on both sides show the clamped
tails; values beyond them, infinities included, are counted in the outermost bins, so the
counts always sum to the number of non-NaN elements. NaNs are counted in one extra bin.

Per-channel tensors are aggregated on the integer grid: each channel uses its own scale and zero
point, and all channels share one histogram over q.

On the CPU, per-tensor binning runs over cache-sized chunks with a few in-place passes each and
counts into interleaved sub-histograms (long runs of one value, like ReLU zeros, would otherwise
serialise the count). The gradient pass sums a gradient and counts its element in one
scatter-add of complex weights (real part: the gradient, imaginary part: 1), into a few rows
that separate threads fill. Nothing per element is allocated: gradients are binned by computing the
indices from the forward value when the gradient arrives (:func:`bin_gradient`), which can
count that value in the same pass. Other devices take the whole-tensor path, which never
synchronises with the host.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_BINS_PER_QBIN = 9
DEFAULT_MARGIN = 0.125
_EPS = torch.finfo(torch.float32).eps
_CHUNK = 1 << 16
_LANES = 4
_OVERFLOW = 1e37


@dataclass(frozen=True)
class GridBins:
    """Histogram bins aligned to the integer quantization grid [quant_min, quant_max]."""

    quant_min: int
    quant_max: int
    bins_per_qbin: int = DEFAULT_BINS_PER_QBIN
    margin_qbins: int = 4

    def __post_init__(self) -> None:
        if self.quant_min >= self.quant_max:
            raise ValueError(
                f"quant_min ({self.quant_min}) must be less than quant_max ({self.quant_max})"
            )
        if self.bins_per_qbin < 1 or self.bins_per_qbin % 2 == 0:
            raise ValueError(
                f"bins_per_qbin must be a positive odd number (got {self.bins_per_qbin}), "
                "so that each grid point sits in the middle of a histogram bin"
            )
        if self.margin_qbins < 1:
            raise ValueError(f"margin_qbins must be at least 1 (got {self.margin_qbins})")

    @classmethod
    def for_range(
        cls,
        quant_min: int,
        quant_max: int,
        *,
        bins_per_qbin: int = DEFAULT_BINS_PER_QBIN,
        margin: float = DEFAULT_MARGIN,
    ) -> GridBins:
        """Bins for a quantization range with a margin of ``margin`` times the range each side."""
        levels = quant_max - quant_min + 1
        margin_qbins = max(2, math.ceil(margin * levels))
        return cls(quant_min, quant_max, bins_per_qbin, margin_qbins)

    @property
    def first_qbin(self) -> int:
        return self.quant_min - self.margin_qbins

    @property
    def last_qbin(self) -> int:
        return self.quant_max + self.margin_qbins

    @property
    def n_qbins(self) -> int:
        return self.quant_max - self.quant_min + 1 + 2 * self.margin_qbins

    @property
    def n_bins(self) -> int:
        return self.n_qbins * self.bins_per_qbin

    @property
    def nan_bin(self) -> int:
        """Index of the extra bin that ``bin_indices`` assigns NaNs to."""
        return self.n_bins

    @property
    def edges(self) -> np.ndarray:
        """Histogram bin edges in grid units (integers are grid points)."""
        start = self.first_qbin - 0.5
        return start + np.arange(self.n_bins + 1, dtype=np.float64) / self.bins_per_qbin

    @property
    def centers(self) -> np.ndarray:
        edges = self.edges
        return (edges[:-1] + edges[1:]) / 2

    @property
    def qbin_of_bin(self) -> np.ndarray:
        """Quantization bin (integer grid point) of every histogram bin."""
        return self.first_qbin + np.arange(self.n_bins) // self.bins_per_qbin

    @property
    def inside(self) -> np.ndarray:
        """Boolean mask of histogram bins inside [quant_min, quant_max]."""
        qbin = self.qbin_of_bin
        return (qbin >= self.quant_min) & (qbin <= self.quant_max)


def effective_zero_point(
    zero_point: torch.Tensor, quant_min: int, quant_max: int
) -> torch.Tensor:
    """The integer zero point a fake quantizer applies: round half to even, then clamp."""
    return torch.round(zero_point.detach().float()).clamp(quant_min, quant_max)


@dataclass(frozen=True)
class QuantGrid:
    """One call's qparams on a histogram grid: which bin each value falls in.

    ``scale`` (float32, clamped to eps like the quantizers do) and ``zero_point`` (the
    effective integer zero point) are detached copies with one element, or one per channel
    along ``ch_axis``; ``grid.quant_min``/``quant_max`` is the quantization range.
    """

    grid: GridBins
    scale: torch.Tensor
    zero_point: torch.Tensor
    ch_axis: int | None = None

    @classmethod
    def capture(
        cls,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        grid: GridBins,
        *,
        ch_axis: int | None = None,
    ) -> QuantGrid:
        """Snapshot of the qparams (later changes to the module's tensors do not leak in)."""
        scale = scale.detach().float().reshape(-1).clamp_min(_EPS)
        zero_point = effective_zero_point(zero_point, grid.quant_min, grid.quant_max).reshape(-1)
        if ch_axis is None and scale.numel() != 1:
            raise ValueError(
                f"per-tensor binning needs one scale, got {scale.numel()}; pass ch_axis for per-channel"
            )
        if zero_point.numel() not in (1, scale.numel()):
            raise ValueError(f"{scale.numel()} scales but {zero_point.numel()} zero points")
        return cls(grid, scale, zero_point.expand(scale.shape).clone(), ch_axis)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """What a fake quantizer with these qparams outputs: (clamp(round(x/s) + z) - z) * s."""
        plan = _Plan.build(x, self)
        q = torch.mul(x.detach().to(plan.compute), plan.inv_scale).round_().add_(plan.zero_point)
        q.clamp_(self.grid.quant_min, self.grid.quant_max).sub_(plan.zero_point)
        return q.mul_(plan.scale)

    def same_qparams(self, other: QuantGrid) -> bool:
        return (
            self is other
            or (
                self.grid.quant_min == other.grid.quant_min
                and self.grid.quant_max == other.grid.quant_max
                and self.ch_axis == other.ch_axis
                and torch.equal(self.scale, other.scale)
                and torch.equal(self.zero_point, other.zero_point)
            )
        )


def _ulp(value: float, dtype: torch.dtype) -> float:
    mantissa_bits = 53 if dtype == torch.float64 else 24
    return 2.0 ** (math.frexp(value)[1] - mantissa_bits)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is a 4-d tensor stored NHWC (then it is flattened in that memory order)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def flatten_as(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """1-d view of ``t`` in NHWC order if ``channels_last`` else in logical order.

    Tensors flattened with the same flag line up element by element whatever their strides,
    so a gradient pairs with the forward value it belongs to; a copy is made only when ``t``
    is not stored in that order.
    """
    if channels_last:
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


@dataclass(frozen=True)
class _Plan:
    """Constants of the index formula for one tensor, shaped to broadcast over it.

    index = clamp(r + w * (u - r), L_lo, L_hi) * B + const, with r = round(u), w just below 1
    and const = B * (z - first) + B / 2; L_lo/L_hi keep the index within the histogram.
    """

    compute: torch.dtype
    scale: torch.Tensor
    inv_scale: torch.Tensor
    zero_point: torch.Tensor
    weight: float
    low: torch.Tensor
    high: torch.Tensor
    const: torch.Tensor
    u_low: torch.Tensor
    u_high: torch.Tensor

    @classmethod
    def build(cls, x: torch.Tensor, qgrid: QuantGrid) -> _Plan:
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        grid = qgrid.grid
        scale = qgrid.scale.to(x.device)
        inv_scale = torch.reciprocal(scale).to(compute)
        zero_point = qgrid.zero_point.to(x.device, compute)
        scale = scale.to(compute)
        if qgrid.ch_axis is not None:
            if x.dim() == 0 or x.shape[qgrid.ch_axis] != scale.numel():
                raise ValueError(
                    f"per-channel binning on axis {qgrid.ch_axis} of shape {tuple(x.shape)} "
                    f"needs that many scales, got {scale.numel()}"
                )
            shape = [1] * x.dim()
            shape[qgrid.ch_axis] = -1
        else:
            shape = []
        scale, inv_scale, zero_point = (t.reshape(shape) for t in (scale, inv_scale, zero_point))
        # Shrink e by delta so that the roundings of the index (ulps of the largest grid
        # coordinate and of the largest lane-offset index) can never carry it into the next
        # quantization bin.
        largest_index = float(_LANES * (grid.n_bins + 1))
        delta = 8 * (_ulp(float(grid.n_qbins + 1), compute) + _ulp(largest_index, compute) / grid.bins_per_qbin)
        B = grid.bins_per_qbin
        return cls(
            compute=compute,
            scale=scale,
            inv_scale=inv_scale,
            zero_point=zero_point,
            weight=1.0 - delta,
            low=grid.first_qbin - zero_point - 0.5 + delta / 2,
            high=grid.last_qbin - zero_point + 0.5 - delta / 2,
            const=(zero_point - grid.first_qbin) * B + B / 2,
            u_low=grid.first_qbin - 2 - zero_point,
            u_high=grid.last_qbin + 2 - zero_point,
        )

    def scalars(self) -> tuple[float, float, float, float, float]:
        """(1/s, z, const, L_lo, L_hi) as Python floats, for the per-tensor CPU loop."""
        return (
            float(self.inv_scale),
            float(self.zero_point),
            float(self.const),
            float(self.low),
            float(self.high),
        )


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


def _weight_pairs(scratch: _Scratch, size: int) -> torch.Tensor:
    """complex128 work buffer whose imaginary parts are all 1 (the real parts are overwritten):
    scatter-adding it sums a weight (real) and counts an element (imaginary) in one pass."""
    key = ("pairs", size, torch.complex128)
    fresh = key not in scratch.buffers
    pairs = scratch.get(*key)
    if fresh:
        torch.view_as_real(pairs)[:, 1].fill_(1.0)
    return pairs


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
_ROWS = 4
"""Rows of sub-histograms the gradient pass scatter-adds into: scatter_add_ counts rows on
separate intra-op threads (torch.bincount is single-threaded). A fixed number, so the float
sums do not depend on the machine's thread count."""


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
    backward computes anyway (see ``eqcore.quant.quantizers``). Indices and weights are scatter-added
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


@dataclass(frozen=True)
class HistogramStats:
    """Summary of a histogram; every mass is a share of the non-NaN elements (or gradient mass)."""

    numel: int
    clamped_below: float
    clamped_above: float
    zero_bin: float
    off_centroid: float
    intra_bin_profile: np.ndarray
    grid_min: float
    grid_max: float
    nan_count: int
    inf_count: int

    @property
    def clamped(self) -> float:
        return self.clamped_below + self.clamped_above

    @property
    def has_nonfinite(self) -> bool:
        return self.nan_count > 0 or self.inf_count > 0


def _to_range(lows: torch.Tensor | None, highs: torch.Tensor | None, row: int) -> tuple[float, float]:
    if lows is None:
        return math.nan, math.nan
    low, high = float(lows[row]), float(highs[row])
    if not (math.isfinite(low) and math.isfinite(high)):
        return math.nan, math.nan
    return low, high


@dataclass(eq=False)
class TensorHistogram:
    """Counts of a tensor's elements on its quantization grid, accumulated over calls.

    Accumulates on the tensor's device; every public attribute reads back on the CPU as numpy.
    ``hist`` and ``bin_edges`` keep the seed's names (``bin_edges`` is in float units for a
    per-tensor histogram, using the scale of the last call, and in grid units for a per-channel
    one). Calls with different scales add up on the grid, not in float units.

    Counts of a call may arrive later (SA hooks count a value together with its gradient, so its
    indices are computed once): such calls are registered with :meth:`defer`, and every read
    settles the ones still outstanding first, so what is read is always complete.
    """

    grid: GridBins
    ch_axis: int | None = None
    _counts: torch.Tensor | None = field(default=None, repr=False)
    _qgrid: QuantGrid | None = field(default=None, repr=False)
    _lows: torch.Tensor | None = field(default=None, repr=False)
    _highs: torch.Tensor | None = field(default=None, repr=False)
    _inf_count: torch.Tensor | None = field(default=None, repr=False)
    _calls: int = field(default=0, repr=False)
    _pending: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False)
    _orphans: list = field(default_factory=list, repr=False)

    def update(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> BinCounts:
        """Add ``x`` binned with the given qparams (one, or one per channel along ``ch_axis``)."""
        qgrid = QuantGrid.capture(scale, zero_point, self.grid, ch_axis=self.ch_axis)
        counted = bin_tensor(x, qgrid)
        self.add(counted, qgrid)
        return counted

    def add(self, counted: BinCounts, qgrid: QuantGrid) -> None:
        """Accumulate one call's counts and extremes; ``qgrid`` becomes the last qparams."""
        if qgrid.grid != self.grid:
            raise ValueError(f"counts on {qgrid.grid} cannot be added to a histogram on {self.grid}")
        if self._counts is None:
            self._counts = counted.counts.clone()
            self._lows = counted.lows.clone()
            self._highs = counted.highs.clone()
            self._inf_count = counted.inf_count.clone()
        else:
            self._counts += counted.counts
            self._lows = torch.minimum(self._lows, counted.lows)
            self._highs = torch.maximum(self._highs, counted.highs)
            self._inf_count = self._inf_count + counted.inf_count
        self._qgrid = qgrid
        self._calls += 1

    def defer(self, pending: object) -> None:
        """Register a call whose counts come later; ``pending.settle()`` must add them."""
        self._pending.add(pending)

    def orphan(self, pending: object) -> None:
        """Keep a deferred call whose backward will never come, to be settled on the next read."""
        self._orphans.append(pending)

    def settle(self, *, orphans_only: bool = False) -> None:
        """Add the counts of every deferred call still outstanding (or only the orphaned ones)."""
        orphans, self._orphans = self._orphans, []
        for pending in orphans if orphans_only else [*orphans, *self._pending]:
            pending.settle()

    @property
    def calls(self) -> int:
        self.settle()
        return self._calls

    @property
    def counts(self) -> np.ndarray:
        self.settle()
        if self._counts is None:
            return np.zeros(self.grid.n_bins, dtype=np.int64)
        return self._counts[: self.grid.n_bins].cpu().numpy()

    hist = counts

    @property
    def nan_count(self) -> int:
        self.settle()
        return 0 if self._counts is None else int(self._counts[self.grid.nan_bin])

    @property
    def inf_count(self) -> int:
        self.settle()
        return 0 if self._inf_count is None else int(self._inf_count)

    @property
    def numel(self) -> int:
        """Elements seen, NaNs included."""
        self.settle()
        return 0 if self._counts is None else int(self._counts.sum())

    @property
    def scale(self) -> np.ndarray:
        """Scale(s) at the last update (float64)."""
        self.settle()
        return self._qgrid.scale.double().cpu().numpy() if self._qgrid is not None else np.ones(1)

    @property
    def zero_point(self) -> np.ndarray:
        """Effective integer zero point(s) at the last update."""
        self.settle()
        if self._qgrid is None:
            return np.zeros(1, dtype=np.int64)
        return self._qgrid.zero_point.cpu().numpy().astype(np.int64)

    @property
    def per_channel(self) -> bool:
        return self.ch_axis is not None

    @property
    def bin_edges(self) -> np.ndarray:
        edges = self.grid.edges
        if self.per_channel:
            return edges
        return (edges - self.zero_point[0]) * self.scale[0]

    @property
    def value_range(self) -> tuple[float, float]:
        """Finite min and max of the data in float units (NaN when nothing finite was seen)."""
        self.settle()
        return _to_range(self._lows, self._highs, 0)

    @property
    def grid_range(self) -> tuple[float, float]:
        """Finite min and max of the data in grid units u + z, each call with its own qparams."""
        self.settle()
        return _to_range(self._lows, self._highs, 1)

    def stats(self) -> HistogramStats:
        return histogram_stats(
            self.counts,
            self.grid,
            zero_point=self.zero_point,
            grid_range=self.grid_range,
            nan_count=self.nan_count,
            inf_count=self.inf_count,
        )


@dataclass(eq=False)
class GradientHistogram:
    """Gradients reaching a tensor, summed per histogram bin of the forward values they belong to.

    ``binned_grads`` (the seed's name) is float64 and reads back on the CPU; it covers the same
    bins as the paired :class:`TensorHistogram`. ``score`` is the sensitivity
    sum(grad^2 * (quantized - x)^2) over every paired element whose forward value was finite
    (computed in grid units, to about 1e-4 relative).
    """

    grid: GridBins
    _sums: torch.Tensor | None = field(default=None, repr=False)
    _score: torch.Tensor | None = field(default=None, repr=False)
    numel: int = 0
    nan_count: int = 0
    inf_count: int = 0
    calls: int = 0

    def update(self, index: torch.Tensor, grad: torch.Tensor) -> None:
        """Add ``grad`` binned by explicit indices (from :func:`bin_indices`, shaped like it)."""
        if index.numel() != grad.numel():
            raise ValueError(f"{grad.numel()} gradients for {index.numel()} indices")
        weights = grad.detach().reshape(-1).double()
        sums = torch.bincount(index.reshape(-1).long(), weights=weights, minlength=self.grid.n_bins + 1)
        self.add(GradientBins(sums, None), grad)

    def add_paired(
        self,
        x: torch.Tensor,
        grad: torch.Tensor,
        qgrid: QuantGrid,
        *,
        quantizer: QuantGrid | None = None,
        scan: ValueScan | None = None,
    ) -> None:
        """Add the gradient of forward value ``x`` binned on ``qgrid`` (see :func:`bin_gradient`)."""
        if qgrid.grid != self.grid:
            raise ValueError(f"gradients on {qgrid.grid} cannot be added to a histogram on {self.grid}")
        self.add(bin_gradient(x, grad, qgrid, quantizer=quantizer, scan=scan), grad)

    def add(self, binned: GradientBins, grad: torch.Tensor) -> None:
        """Accumulate one backward's sums (and score) of ``grad``."""
        if not bool(torch.isfinite(binned.sums).all()):
            self.nan_count += int(torch.isnan(grad).sum())
            self.inf_count += int(torch.isinf(grad).sum())
        self._sums = binned.sums if self._sums is None else self._sums + binned.sums
        if binned.score is not None:
            self._score = binned.score if self._score is None else self._score + binned.score
        self.numel += grad.numel()
        self.calls += 1

    @property
    def binned_grads(self) -> np.ndarray:
        if self._sums is None:
            return np.zeros(self.grid.n_bins, dtype=np.float64)
        return self._sums[: self.grid.n_bins].cpu().numpy()

    @property
    def nan_grad_sum(self) -> float:
        """Sum of the gradients that reached NaN forward values."""
        return 0.0 if self._sums is None else float(self._sums[self.grid.nan_bin])

    @property
    def total(self) -> float:
        """Sum of every gradient seen (those of NaN forward values included)."""
        return 0.0 if self._sums is None else float(self._sums.sum())

    @property
    def score(self) -> float:
        """Sensitivity sum(grad^2 * (quantized - x)^2); NaN when no score was computed."""
        return math.nan if self._score is None else float(self._score)

    @property
    def has_nonfinite(self) -> bool:
        return self.nan_count > 0 or self.inf_count > 0

    def stats(
        self,
        *,
        zero_point: np.ndarray | int = 0,
        grid_range: tuple[float, float] = (math.nan, math.nan),
    ) -> HistogramStats:
        """Statistics of the gradient mass |binned_grads| (shares of the total absolute mass)."""
        return histogram_stats(
            np.abs(self.binned_grads),
            self.grid,
            zero_point=zero_point,
            grid_range=grid_range,
            nan_count=self.nan_count,
            inf_count=self.inf_count,
            numel=self.numel,
        )


def histogram_stats(
    counts: np.ndarray,
    grid: GridBins,
    *,
    zero_point: np.ndarray | int = 0,
    grid_range: tuple[float, float] = (math.nan, math.nan),
    nan_count: int = 0,
    inf_count: int = 0,
    numel: int | None = None,
) -> HistogramStats:
    """Statistics of grid-aligned ``counts``; pure numpy, so baselines can be re-summarised.

    ``counts`` may be any non-negative mass per bin (e.g. |binned gradients|); ``numel``
    defaults to the total count plus NaNs.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    share = counts / total if total > 0 else np.zeros_like(counts)
    qbin = grid.qbin_of_bin
    inside = grid.inside
    below = float(share[qbin < grid.quant_min].sum())
    above = float(share[qbin > grid.quant_max].sum())
    zero_points = np.unique(np.asarray(zero_point).reshape(-1))
    zero_bin = float(share[np.isin(qbin, zero_points)].sum())
    position = np.arange(grid.n_bins) % grid.bins_per_qbin
    centroid = grid.bins_per_qbin // 2
    off_centroid = float(share[inside & (position != centroid)].sum())
    inside_counts = counts[inside].reshape(-1, grid.bins_per_qbin).sum(axis=0)
    inside_total = inside_counts.sum()
    profile = inside_counts / inside_total if inside_total > 0 else np.zeros(grid.bins_per_qbin)
    return HistogramStats(
        numel=int(total) + int(nan_count) if numel is None else int(numel),
        clamped_below=below,
        clamped_above=above,
        zero_bin=zero_bin,
        off_centroid=off_centroid,
        intra_bin_profile=profile,
        grid_min=grid_range[0],
        grid_max=grid_range[1],
        nan_count=int(nan_count),
        inf_count=int(inf_count),
    )


def resampled_grid(
    scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int, bit_res: int | None
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Qparams of a ``bit_res``-bit grid spanning the same float range as the module's grid.

    ``bit_res`` only sets the plotting/binning resolution (as in the seeds); when it matches the
    module's bit width (or is None) the module's own grid comes back unchanged.
    """
    levels = quant_max - quant_min + 1
    if bit_res is None or 2**bit_res == levels:
        return scale, zero_point, quant_min, quant_max
    if not 2 <= bit_res <= 16:
        raise ValueError(f"bit_res must be between 2 and 16 (got {bit_res})")
    new_levels = 2**bit_res
    signed = quant_min < 0
    new_min = -(new_levels // 2) if signed else 0
    new_max = new_min + new_levels - 1
    ratio = (quant_max - quant_min) / (new_max - new_min)
    new_scale = scale.detach() * ratio
    zp = effective_zero_point(zero_point, quant_min, quant_max)
    new_zp = torch.round(new_min + (zp - quant_min) / ratio).clamp(new_min, new_max)
    return new_scale, new_zp, new_min, new_max
