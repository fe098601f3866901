"""Grid-aligned histogram bins: where a tensor's elements sit on its quantization grid.

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

This module holds the grid itself (:class:`GridBins`), one call's qparams on it
(:class:`QuantGrid`, :func:`resampled_grid`) and the constants of the index formula (``_Plan``)
that the tensor and gradient binning (:mod:`eqcore.analysis.binning`,
:mod:`eqcore.analysis.gradient_binning`) both evaluate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_BINS_PER_QBIN = 9
DEFAULT_MARGIN = 0.125
_EPS = torch.finfo(torch.float32).eps
_LANES = 4


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
