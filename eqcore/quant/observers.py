"""Range-setting observers beyond torch's min/max: percentile, MSE-optimal and KL (entropy).

All three collect a fine histogram of the data over a symmetric range [-R, R] that doubles when
new data falls outside it (bins merge exactly, so no data is re-binned approximately), then
choose a clipping range from it in ``calculate_qparams``. They are torch.ao observers: use them
anywhere a torch.ao observer goes, e.g. ``EQLearnableFakeQuantize.with_args(observer=MSEObserver)``
or ``MSEObserver.with_args(quant_min=0, quant_max=255)``. Per-tensor only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from eqcore._torch_ao import UniformQuantizationObserverBase

DEFAULT_BINS = 2048


class _RangeHistogramObserver(UniformQuantizationObserverBase):
    """Collects a histogram over a doubling symmetric range; subclasses pick the clip range."""

    histogram: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor
    hist_range: torch.Tensor

    def __init__(
        self,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        bins: int = DEFAULT_BINS,
        eps: float = torch.finfo(torch.float32).eps,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        if qscheme not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise ValueError(
                f"{type(self).__name__} supports per-tensor qschemes only, got {qscheme}; "
                "use torch.ao.quantization.PerChannelMinMaxObserver for per-channel weights"
            )
        if not (isinstance(bins, int) and bins >= 16 and bins & (bins - 1) == 0):
            raise ValueError(f"bins must be a power of two >= 16, got {bins!r}")
        super().__init__(
            dtype=dtype,
            qscheme=qscheme,
            reduce_range=reduce_range,
            quant_min=quant_min,
            quant_max=quant_max,
            eps=eps,
            is_dynamic=is_dynamic,
            **kwargs,
        )
        self.bins = bins
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("hist_range", torch.tensor(0.0))

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach().to(self.histogram.device, torch.float32).reshape(-1)
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            x = x[finite]
            if x.numel() == 0:
                return x_orig
        lo, hi = torch.aminmax(x)
        self.min_val.copy_(torch.minimum(self.min_val, lo))
        self.max_val.copy_(torch.maximum(self.max_val, hi))
        self._grow_to(float(torch.maximum(hi.abs(), lo.abs())))
        bound = float(self.hist_range)
        self.histogram += torch.histc(x, bins=self.bins, min=-bound, max=bound).double()
        return x_orig

    def _grow_to(self, needed: float) -> None:
        current = float(self.hist_range)
        if needed <= current:
            return
        if current == 0.0:
            self.hist_range.fill_(needed if needed > 0 else 1.0)
            return
        factor = 2 ** math.ceil(math.log2(needed / current))
        self.hist_range.fill_(current * factor)
        if factor >= self.bins:
            merged = torch.zeros_like(self.histogram)
            half = self.bins // 2
            merged[half - 1] = self.histogram[:half].sum()
            merged[half] = self.histogram[half:].sum()
        else:
            folded = self.histogram.reshape(-1, factor).sum(1)
            start = (self.bins - folded.numel()) // 2
            merged = torch.zeros_like(self.histogram)
            merged[start : start + folded.numel()] = folded
        self.histogram.copy_(merged)

    def _bin_centers(self) -> np.ndarray:
        bound = float(self.hist_range)
        edges = np.linspace(-bound, bound, self.bins + 1)
        return (edges[:-1] + edges[1:]) / 2

    def _has_data(self) -> bool:
        return bool(self.histogram.sum() > 0)

    def _clip_range(self) -> tuple[float, float]:
        raise NotImplementedError

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._has_data():
            return self._calculate_qparams(self.min_val, self.max_val)
        lo, hi = self._clip_range()
        return self._calculate_qparams(torch.tensor(lo), torch.tensor(hi))

    def extra_repr(self) -> str:
        return f"min_val={float(self.min_val)}, max_val={float(self.max_val)}, bins={self.bins}"

    def reset_min_max_vals(self) -> None:
        self.histogram.zero_()
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))
        self.hist_range.fill_(0.0)


class PercentileObserver(_RangeHistogramObserver):
    """Clips the range at the given percentile of the data on each side (100 = min/max).

    Non-negative data keeps 0 as its lower end.
    """

    def __init__(self, *args: Any, percentile: float = 99.99, **kwargs: Any) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        super().__init__(*args, **kwargs)
        self.percentile = percentile

    def _clip_range(self) -> tuple[float, float]:
        counts = self.histogram.cpu().numpy()
        cdf = np.cumsum(counts) / counts.sum()
        bound = float(self.hist_range)
        width = 2 * bound / self.bins
        tail = 1.0 - self.percentile / 100.0
        upper_bin = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
        lower_bin = int(np.searchsorted(cdf, tail, side="right"))
        hi = min(-bound + (upper_bin + 1) * width, float(self.max_val))
        lo = max(-bound + lower_bin * width, float(self.min_val))
        if float(self.min_val) >= 0:
            lo = float(self.min_val)
        return lo, max(hi, lo)


class MSEObserver(_RangeHistogramObserver):
    """Chooses the clip range that minimises the expected squared quantization error.

    Candidates shrink the observed [min, max] towards zero by factors in [min_ratio, 1]; the error
    of each is evaluated on the histogram (rounding and clamping error together).
    """

    def __init__(self, *args: Any, candidates: int = 100, min_ratio: float = 0.1, **kwargs: Any) -> None:
        if candidates < 2 or not 0.0 < min_ratio < 1.0:
            raise ValueError(
                f"need candidates >= 2 and 0 < min_ratio < 1, got {candidates!r} and {min_ratio!r}"
            )
        super().__init__(*args, **kwargs)
        self.candidates = candidates
        self.min_ratio = min_ratio

    def _clip_range(self) -> tuple[float, float]:
        counts = self.histogram.cpu().numpy()
        centers = self._bin_centers()
        used = counts > 0
        counts, centers = counts[used], centers[used]
        lo0, hi0 = float(self.min_val), float(self.max_val)
        best, best_error = (lo0, hi0), math.inf
        for ratio in np.linspace(self.min_ratio, 1.0, self.candidates):
            lo, hi = lo0 * ratio, hi0 * ratio
            scale, zero_point = self._calculate_qparams(torch.tensor(lo), torch.tensor(hi))
            s, z = float(scale), int(zero_point)
            q = np.clip(np.rint(centers / s) + z, self.quant_min, self.quant_max)
            error = float(np.dot(counts, ((q - z) * s - centers) ** 2))
            if error < best_error:
                best, best_error = (lo, hi), error
        return best


class KLObserver(_RangeHistogramObserver):
    """Entropy calibration: the clip threshold minimising KL(P || Q) of the |x| distribution.

    P is the histogram of |x| clipped at the threshold (the tail folded into the last bin), Q the
    same histogram quantized to the grid's levels. Non-negative data gets the range [0, T], other
    data [-T, T].
    """

    def __init__(self, *args: Any, max_candidates: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_candidates = max_candidates

    def _clip_range(self) -> tuple[float, float]:
        counts = self.histogram.cpu().numpy()
        half = self.bins // 2
        magnitude = counts[half:] + counts[:half][::-1]
        bound = float(self.hist_range)
        width = bound / half
        nonnegative = float(self.min_val) >= 0
        levels = self.quant_max - self.quant_min + 1
        target = levels if nonnegative else levels // 2
        last = int(np.nonzero(magnitude)[0][-1]) + 1
        if last <= target:
            threshold = last * width
        else:
            stride = max(1, (last - target) // self.max_candidates)
            best_i, best_kl = last, math.inf
            for i in range(target, last + 1, stride):
                kl = _clipped_kl(magnitude, i, target)
                if kl < best_kl:
                    best_i, best_kl = i, kl
            threshold = best_i * width
        threshold = min(threshold, max(abs(float(self.min_val)), abs(float(self.max_val))))
        if nonnegative:
            return 0.0, threshold
        return -threshold, threshold


def _clipped_kl(magnitude: np.ndarray, cut: int, levels: int) -> float:
    """KL(P || Q): P is the histogram clipped at ``cut`` with the tail folded into its last bin,
    Q the unclipped bins below ``cut`` quantized to ``levels`` levels (spread over their nonzero
    bins), as in entropy calibration."""
    kept = magnitude[:cut].astype(np.float64)
    reference = kept.copy()
    reference[-1] += magnitude[cut:].sum()
    starts = np.unique(np.linspace(0, cut, levels + 1).astype(np.int64)[:-1])
    group_sum = np.add.reduceat(kept, starts)
    group_nonzero = np.add.reduceat((kept > 0).astype(np.float64), starts)
    group_of_bin = np.repeat(np.arange(starts.size), np.diff(np.append(starts, cut)))
    density = np.divide(group_sum, group_nonzero, out=np.zeros_like(group_sum), where=group_nonzero > 0)
    quantized = np.where(kept > 0, density[group_of_bin], 0.0)
    if quantized.sum() <= 0:
        return math.inf
    p = reference / reference.sum()
    q = quantized / quantized.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
