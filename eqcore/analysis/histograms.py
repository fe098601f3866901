"""Histograms accumulated over calls, and their statistics.

A :class:`TensorHistogram` counts a tensor's elements on its quantization grid call after call,
a :class:`GradientHistogram` sums the gradients reaching it on the same bins, and
:func:`histogram_stats` summarises either (pure numpy, so baselines can be re-summarised).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from eqcore.analysis.binning import BinCounts, ValueScan, bin_tensor
from eqcore.analysis.gradient_binning import GradientBins, bin_gradient
from eqcore.analysis.grid import GridBins, QuantGrid


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
