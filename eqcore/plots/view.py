"""The data a plot is drawn from: :class:`HistogramView` and its per-level reductions.

A view holds plain arrays (no torch objects), built from the hooks' results or rebuilt from
stored NPZ arrays, so plots redraw without torch. The private helpers below reduce a view's
histogram bins to quantization levels (shares, smoothing, the intra-bin profile) and map grid
levels to plot x (:class:`_Axis`), for the panel drawing and figure assembly modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from eqcore.analysis.grid import GridBins
from eqcore.analysis.histograms import (
    GradientHistogram,
    HistogramStats,
    TensorHistogram,
    histogram_stats,
)
from eqcore.plots.style import SMOOTH_QBINS

@dataclass(frozen=True, eq=False)
class HistogramView:
    """The arrays a plot is drawn from: one histogram on its grid, optionally with gradients.

    ``counts`` and ``binned_grads`` are per histogram bin of ``grid``; ``scale`` and
    ``zero_point`` hold one value (per tensor) or one per channel. ``value_range`` is the
    tensor's finite min/max in float units and ``grid_range`` in grid units (NaN when unknown).
    Build one with :meth:`of` from the hooks' results, or with :meth:`from_arrays` from stored
    baselines (:meth:`to_arrays` gives NPZ-safe arrays), so plots redraw without torch objects.
    """

    grid: GridBins
    counts: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    per_channel: bool = False
    value_range: tuple[float, float] = (math.nan, math.nan)
    grid_range: tuple[float, float] = (math.nan, math.nan)
    nan_count: int = 0
    inf_count: int = 0
    binned_grads: np.ndarray | None = None
    grad_numel: int | None = None
    grad_nan_count: int = 0
    grad_inf_count: int = 0

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts, dtype=np.float64).reshape(-1)
        if counts.shape != (self.grid.n_bins,):
            raise ValueError(
                f"counts has {counts.size} bins but the grid has {self.grid.n_bins}; "
                "pass the counts of this grid's histogram"
            )
        scale = np.asarray(self.scale, dtype=np.float64).reshape(-1)
        zero_point = np.asarray(self.zero_point, dtype=np.int64).reshape(-1)
        if scale.size == 0 or zero_point.size not in (1, scale.size):
            raise ValueError(
                f"need one scale and zero point (or one per channel), got {scale.size} scales "
                f"and {zero_point.size} zero points"
            )
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zero_point)
        for name in ("value_range", "grid_range"):
            lo, hi = getattr(self, name)
            object.__setattr__(self, name, (float(lo), float(hi)))
        if self.binned_grads is not None:
            grads = np.asarray(self.binned_grads, dtype=np.float64).reshape(-1)
            if grads.shape != counts.shape:
                raise ValueError(
                    f"binned_grads has {grads.size} bins but counts has {counts.size}; "
                    "gradients must be binned on the same grid as the forward histogram"
                )
            object.__setattr__(self, "binned_grads", grads)

    @classmethod
    def of(cls, hist: Any, grads: Any = None) -> HistogramView:
        """A view of a hooks result, with the gradients of ``grads`` (if given) attached.

        ``hist`` is a :class:`TensorHistogram`, a :class:`HistogramView`, or a result that
        holds one as ``.histogram`` (the hooks' ``WeightHistogram`` and ``ModuleSA``, whose
        ``.gradients`` are used when ``grads`` is None). ``grads`` is a
        :class:`GradientHistogram` or an array of binned gradients.
        """
        if not isinstance(hist, (TensorHistogram, HistogramView)):
            inner = getattr(hist, "histogram", None)
            if not isinstance(inner, TensorHistogram):
                raise TypeError(
                    "expected a TensorHistogram, a HistogramView or a hooks result with a "
                    f".histogram, got {type(hist).__name__}"
                )
            grads = getattr(hist, "gradients", None) if grads is None else grads
            hist = inner
        if isinstance(hist, HistogramView):
            base = {f.name: getattr(hist, f.name) for f in fields(hist)}
        else:
            base = dict(
                grid=hist.grid, counts=hist.counts, scale=hist.scale,
                zero_point=hist.zero_point, per_channel=hist.per_channel,
                value_range=hist.value_range, grid_range=hist.grid_range,
                nan_count=hist.nan_count, inf_count=hist.inf_count,
            )
        if isinstance(grads, GradientHistogram):
            base.update(binned_grads=grads.binned_grads, grad_numel=grads.numel,
                        grad_nan_count=grads.nan_count, grad_inf_count=grads.inf_count)
        elif grads is not None:
            base.update(binned_grads=np.asarray(grads), grad_numel=None, grad_nan_count=0,
                        grad_inf_count=0)
        return cls(**base)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numeric arrays (NPZ-safe, no pickling) that :meth:`from_arrays` reads back."""
        grid = self.grid
        arrays = {
            "counts": self.counts,
            "grid": np.array([grid.quant_min, grid.quant_max, grid.bins_per_qbin,
                              grid.margin_qbins], dtype=np.int64),
            "scale": self.scale,
            "zero_point": self.zero_point,
            "per_channel": np.array(self.per_channel),
            "value_range": np.array(self.value_range, dtype=np.float64),
            "grid_range": np.array(self.grid_range, dtype=np.float64),
            "nonfinite": np.array([self.nan_count, self.inf_count], dtype=np.int64),
        }
        if self.binned_grads is not None:
            arrays["binned_grads"] = self.binned_grads
            arrays["grad_counts"] = np.array(
                [-1 if self.grad_numel is None else self.grad_numel, self.grad_nan_count,
                 self.grad_inf_count], dtype=np.int64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> HistogramView:
        """The view :meth:`to_arrays` stored (e.g. ``np.load(path, allow_pickle=False)``)."""
        qmin, qmax, bins_per_qbin, margin = (int(v) for v in np.asarray(arrays["grid"]))
        nan_count, inf_count = (int(v) for v in np.asarray(arrays.get("nonfinite", (0, 0))))
        nan_range = (math.nan, math.nan)
        grad_numel, grad_nan, grad_inf = (int(v) for v in np.asarray(arrays.get("grad_counts", (-1, 0, 0))))
        return cls(
            grid=GridBins(qmin, qmax, bins_per_qbin, margin),
            counts=arrays["counts"],
            scale=arrays["scale"],
            zero_point=arrays["zero_point"],
            per_channel=bool(np.asarray(arrays.get("per_channel", False))),
            value_range=tuple(np.asarray(arrays.get("value_range", nan_range), dtype=np.float64)),
            grid_range=tuple(np.asarray(arrays.get("grid_range", nan_range), dtype=np.float64)),
            nan_count=nan_count,
            inf_count=inf_count,
            binned_grads=arrays.get("binned_grads"),
            grad_numel=None if grad_numel < 0 else grad_numel,
            grad_nan_count=grad_nan,
            grad_inf_count=grad_inf,
        )

    def stats(self) -> HistogramStats:
        """The same statistics as :meth:`TensorHistogram.stats` of the source histogram."""
        return histogram_stats(
            self.counts, self.grid, zero_point=self.zero_point, grid_range=self.grid_range,
            nan_count=self.nan_count, inf_count=self.inf_count,
        )

    def grad_stats(self) -> HistogramStats | None:
        """Statistics of the gradient mass |binned_grads|, as :meth:`GradientHistogram.stats`."""
        if self.binned_grads is None:
            return None
        return histogram_stats(
            np.abs(self.binned_grads), self.grid, zero_point=self.zero_point,
            grid_range=self.grid_range, nan_count=self.grad_nan_count,
            inf_count=self.grad_inf_count, numel=self.grad_numel,
        )


class _Axis:
    """Maps grid levels to plot x: float values for a per-tensor grid, levels for per-channel."""

    def __init__(self, view: HistogramView) -> None:
        self.float_units = not view.per_channel
        self.scale = float(view.scale[0])
        self.zero_point = int(view.zero_point[0])

    def x(self, q: np.ndarray | float) -> np.ndarray:
        q = np.asarray(q, dtype=np.float64)
        return (q - self.zero_point) * self.scale if self.float_units else q


def _per_qbin(values: np.ndarray, grid: GridBins) -> np.ndarray:
    return values.reshape(grid.n_qbins, grid.bins_per_qbin).sum(axis=1)


def _share(values: np.ndarray) -> np.ndarray:
    total = values.sum()
    return values / total if total > 0 else np.zeros_like(values)


def _smooth(share: np.ndarray, width: int = SMOOTH_QBINS) -> np.ndarray:
    return np.convolve(share, np.ones(width) / width, mode="same")


def _major_levels(grid: GridBins) -> np.ndarray:
    """Grid levels that get a faint full-height line: about eight, on powers of two."""
    levels = grid.quant_max - grid.quant_min + 1
    step = max(1, 2 ** max(0, round(math.log2(levels)) - 3))
    inner = np.arange(grid.quant_min, grid.quant_max + 1, step)
    return np.unique(np.concatenate([inner, [grid.quant_max]]))


def _zero_levels(view: HistogramView) -> np.ndarray:
    return np.unique(view.zero_point)


def _data_extent_q(view: HistogramView, values: np.ndarray) -> tuple[float, float] | None:
    """Min/max of the data in grid units (exact when recorded, else the occupied bins)."""
    if all(math.isfinite(v) for v in view.grid_range):
        return view.grid_range
    occupied = np.flatnonzero(values > 0)
    if occupied.size == 0:
        return None
    edges = view.grid.edges
    return float(edges[occupied[0]]), float(edges[occupied[-1] + 1])


def _profile(values: np.ndarray, view: HistogramView) -> np.ndarray:
    """Mean intra-bin profile inside the grid, without the zero bin (reported on its own)."""
    grid = view.grid
    per_level = values.reshape(grid.n_qbins, grid.bins_per_qbin)
    level = grid.first_qbin + np.arange(grid.n_qbins)
    keep = (level >= grid.quant_min) & (level <= grid.quant_max)
    keep &= ~np.isin(level, _zero_levels(view))
    return _share(per_level[keep].sum(axis=0))
