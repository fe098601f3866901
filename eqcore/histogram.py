"""Grid-aligned histograms: where a tensor's elements sit on its quantization grid.

Pure tensor math on the tensor's own device. A value x with scale s and zero point z has the
grid coordinate u = x * (1/s) (the product the quantizer itself rounds), lands in quantization
bin q = round_half_even(u) + z, and sits at e = u - round(u) in [-1/2, 1/2] inside that bin.
Each quantization bin is split into ``bins_per_qbin`` histogram bins by e, so an element is in
exactly the quantization bin the fake quantizer puts it in, ties included, and the middle
histogram bin of each quantization bin holds its centroid. ``margin_qbins`` quantization bins on
both sides show the clamped tails; values beyond them are counted in the outermost bins, so the
counts always sum to the number of non-NaN elements. NaNs are counted apart.

Per-channel tensors are aggregated on the integer grid: each channel uses its own scale and zero
point, and all channels share one histogram over q.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_BINS_PER_QBIN = 9
DEFAULT_MARGIN = 0.125


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


def _broadcast_shape(x: torch.Tensor, ch_axis: int | None) -> tuple[int, ...] | None:
    if ch_axis is None:
        return None
    shape = [1] * x.dim()
    shape[ch_axis] = x.shape[ch_axis]
    return tuple(shape)


def bin_indices(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    grid: GridBins,
    *,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """Histogram bin index (int32) of every element of ``x``; NaNs get ``grid.nan_bin``.

    ``scale`` and ``zero_point`` have one element (per tensor) or ``x.shape[ch_axis]`` elements.
    The bin of x is the one the fake quantizer rounds it into, at every rounding tie.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.detach().to(compute)
    scale = scale.detach().to(device=x.device, dtype=compute)
    zp = effective_zero_point(zero_point, grid.quant_min, grid.quant_max).to(x.device, compute)
    shape = _broadcast_shape(x, ch_axis)
    if shape is not None:
        scale = scale.reshape(shape)
        zp = zp.reshape(shape)
    elif scale.numel() != 1:
        raise ValueError(
            f"per-tensor binning needs one scale, got {scale.numel()}; pass ch_axis for per-channel"
        )
    inv_scale = torch.reciprocal(scale.clamp_min(torch.finfo(torch.float32).eps))
    u = x * inv_scale
    rounded = torch.round(u)
    sub = (u - rounded).add_(0.5).mul_(grid.bins_per_qbin).floor_()
    sub.nan_to_num_(nan=0.0).clamp_(0, grid.bins_per_qbin - 1)
    index = rounded.add_(zp - grid.first_qbin).mul_(grid.bins_per_qbin).add_(sub)
    index.clamp_(0, grid.n_bins - 1).nan_to_num_(nan=float(grid.nan_bin))
    return index.to(torch.int32)


@dataclass(frozen=True)
class HistogramStats:
    """Summary of a histogram; every mass is a share of the non-NaN elements."""

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


@dataclass
class TensorHistogram:
    """Counts of a tensor's elements on its quantization grid, accumulated over calls.

    Accumulates on the tensor's device; every public attribute reads back on the CPU.
    ``hist`` and ``bin_edges`` keep the seed's names (``bin_edges`` is in float units for a
    per-tensor histogram and in grid units for a per-channel one).
    """

    grid: GridBins
    ch_axis: int | None = None
    _counts: torch.Tensor | None = field(default=None, repr=False)
    _scale: torch.Tensor | None = field(default=None, repr=False)
    _zero_point: torch.Tensor | None = field(default=None, repr=False)
    _extremes: list[torch.Tensor] = field(default_factory=list, repr=False)
    inf_count: int = 0
    calls: int = 0

    def update(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """Add ``x`` to the histogram and return its bin indices (for pairing gradients)."""
        index = bin_indices(x, scale, zero_point, self.grid, ch_axis=self.ch_axis)
        counts = torch.bincount(index.flatten(), minlength=self.grid.n_bins + 1)
        self._counts = counts if self._counts is None else self._counts + counts
        self._scale = scale.detach().clone()
        self._zero_point = effective_zero_point(zero_point, self.grid.quant_min, self.grid.quant_max)
        if x.numel():
            lo, hi = torch.aminmax(x.detach())
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                lo, hi = self._finite_extremes(x)
            self._extremes.append(torch.stack([lo, hi]).float())
        self.calls += 1
        return index

    def _finite_extremes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach()
        self.inf_count += int(torch.isinf(x).sum())
        finite = x[torch.isfinite(x)]
        if finite.numel() == 0:
            nan = torch.tensor(float("nan"), device=x.device)
            return nan, nan
        return torch.aminmax(finite)

    @property
    def counts(self) -> np.ndarray:
        if self._counts is None:
            return np.zeros(self.grid.n_bins, dtype=np.int64)
        return self._counts[: self.grid.n_bins].cpu().numpy()

    hist = counts

    @property
    def nan_count(self) -> int:
        return 0 if self._counts is None else int(self._counts[self.grid.nan_bin])

    @property
    def numel(self) -> int:
        """Elements seen, NaNs included."""
        return 0 if self._counts is None else int(self._counts.sum())

    @property
    def scale(self) -> np.ndarray:
        """Scale(s) at the last update (float64)."""
        return self._scale.double().cpu().numpy().reshape(-1) if self._scale is not None else np.ones(1)

    @property
    def zero_point(self) -> np.ndarray:
        """Effective integer zero point(s) at the last update."""
        if self._zero_point is None:
            return np.zeros(1, dtype=np.int64)
        return self._zero_point.cpu().numpy().reshape(-1).astype(np.int64)

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
        if not self._extremes:
            return math.nan, math.nan
        extremes = torch.stack(self._extremes).cpu()
        return float(np.nanmin(extremes[:, 0].numpy())), float(np.nanmax(extremes[:, 1].numpy()))

    @property
    def grid_range(self) -> tuple[float, float]:
        """The data's dynamic range in grid units (q), using the smallest scale per side."""
        lo, hi = self.value_range
        scale = self.scale
        zp = self.zero_point
        lo_q = np.min(lo / scale + zp)
        hi_q = np.max(hi / scale + zp)
        return float(lo_q), float(hi_q)

    def stats(self) -> HistogramStats:
        return histogram_stats(
            self.counts,
            self.grid,
            zero_point=self.zero_point,
            grid_range=self.grid_range,
            nan_count=self.nan_count,
            inf_count=self.inf_count,
        )


@dataclass
class GradientHistogram:
    """Gradients reaching a tensor, summed per histogram bin of the forward values they belong to.

    ``binned_grads`` (the seed's name) is float64 and reads back on the CPU; it covers the same
    bins as the paired :class:`TensorHistogram`.
    """

    grid: GridBins
    _sums: torch.Tensor | None = field(default=None, repr=False)
    calls: int = 0

    def update(self, index: torch.Tensor, grad: torch.Tensor) -> None:
        weights = grad.detach().flatten()
        if weights.dtype not in (torch.float32, torch.float64):
            weights = weights.float()
        sums = torch.bincount(index.flatten(), weights=weights, minlength=self.grid.n_bins + 1)
        sums = sums.double()
        self._sums = sums if self._sums is None else self._sums + sums
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


def histogram_stats(
    counts: np.ndarray,
    grid: GridBins,
    *,
    zero_point: np.ndarray | int = 0,
    grid_range: tuple[float, float] = (math.nan, math.nan),
    nan_count: int = 0,
    inf_count: int = 0,
) -> HistogramStats:
    """Statistics of grid-aligned ``counts``; pure numpy, so baselines can be re-summarised."""
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
        numel=int(total) + int(nan_count),
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
