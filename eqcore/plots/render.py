"""Drawing of QTH and sensitivity-analysis figures from plain histogram data.

Everything here is a pure function of a :class:`HistogramView` (arrays, no torch objects), drawn
on a bare ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot state, no global backend
switch, and a fixed style applied through a context, so the same data always gives the same
pixels. A model has dozens of quantizers and CI redraws them all, so a plot is kept to tens of
milliseconds: fixed geometry (no ``tight_layout``), panels drawn straight on the figure instead
of ``Axes`` (see :class:`_Frame`), one path per family of lines, and the texts every plot repeats
blitted from a cache (see :class:`_CachedTexts`).
"""

from __future__ import annotations

import io
import math
import os
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import matplotlib
import matplotlib.style
import numpy as np
from PIL import Image
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.colors import to_hex
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from matplotlib.ticker import LogLocator, MaxNLocator
from matplotlib.transforms import (
    Bbox,
    BboxTransformFrom,
    BboxTransformTo,
    TransformedBbox,
    blended_transform_factory,
)

from eqcore.analysis.histogram import (
    GradientHistogram,
    GridBins,
    HistogramStats,
    TensorHistogram,
    histogram_stats,
)

DEFAULT_FIGSIZE = (8.0, 5.0)
DEFAULT_SA_FIGSIZE = (8.0, 6.0)
DEFAULT_DPI = 100
SMOOTH_QBINS = 5
"""Width of the moving average, in quantization bins, of the smoothed curves."""

FORWARD_COLOR = "#1f77b4"
FORWARD_DARK = "#0d3a66"
GRAD_COLOR = "#2ca02c"
GRAD_DARK = "#145214"
CLAMP_COLOR = "#d62728"
GRID_COLOR = "#555555"
MINUS = "\u2212"
TICK_INCHES = 0.045
TICK_FONT = 7.5
LABEL_FONT = 8.5
MAIN_LEFT, MAIN_WIDTH = 0.085, 0.635
SIDE_LEFT, SIDE_WIDTH = 0.775, 0.2

PLOT_STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 9.0,
    "axes.titlesize": 9.0,
    "axes.labelsize": 8.5,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "legend.fontsize": 7.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.linewidth": 0.8,
    "axes.formatter.useoffset": False,
    "axes.formatter.limits": (-3, 4),
    "axes.unicode_minus": True,
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "savefig.edgecolor": "white",
    "savefig.dpi": "figure",
    "savefig.bbox": None,
    "savefig.pad_inches": 0.1,
    "text.hinting": "no_hinting",
    "text.antialiased": True,
    "text.usetex": False,
    "lines.antialiased": True,
    "patch.antialiased": True,
    "path.simplify": True,
    "agg.path.chunksize": 0,
    "svg.hashsalt": "eqcore",
}
"""rcParams every eqcore figure is built and saved under (on top of matplotlib's defaults)."""

PNG_COMPRESS_LEVEL = 1
"""zlib level of the PNGs: level 1 takes half of level 6's time for ~5% more bytes."""


@contextmanager
def plot_style():
    """Matplotlib's defaults plus :data:`PLOT_STYLE`, for the duration of the block only."""
    with matplotlib.style.context(("default", PLOT_STYLE)):
        yield


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


def _pct(share: float) -> str:
    if not math.isfinite(share):
        return "n/a"
    if share == 0:
        return "0%"
    if share < 1e-4:
        return f"{100 * share:.1e}%"
    return f"{100 * share:.2f}%"


def _num(value: float) -> str:
    return f"{value:.4g}".replace("-", MINUS)


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


def _steps(x_edges: np.ndarray, heights: np.ndarray, base: float) -> tuple[np.ndarray, np.ndarray]:
    """Outline and filled polygon of a step histogram."""
    outline = np.column_stack([np.repeat(x_edges, 2)[1:-1], np.repeat(heights, 2)])
    polygon = np.vstack([[x_edges[0], base], outline, [x_edges[-1], base]])
    return outline, polygon


def _segments(xs: Sequence[float] | np.ndarray, y0: float, y1: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertical segments at ``xs`` as one NaN-separated polyline (one path, not one per line)."""
    xs = np.asarray(xs, dtype=np.float64)
    x = np.repeat(xs, 3)
    x[2::3] = np.nan
    y = np.tile([y0, y1, np.nan], xs.size)
    return x, y


def _decimal_labels(values: np.ndarray, *, suffix: str = "") -> list[str]:
    """Shortest common fixed-point labels that represent every tick exactly."""
    if values.size == 0:
        return []
    step = float(np.min(np.diff(values))) if values.size > 1 else max(abs(float(values[0])), 1.0)
    decimals = 0
    while decimals < 10 and np.any(np.abs(np.round(values, decimals) - values) > 1e-6 * step):
        decimals += 1
    labels = []
    for value in values:
        text = f"{value:.{decimals}f}"
        if float(text) == 0:
            text = f"{0:.{decimals}f}"
        labels.append(text.replace("-", MINUS) + suffix)
    return labels


def _inside(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    tolerance = 1e-9 * max(abs(hi - lo), 1e-300)
    return values[(values >= lo - tolerance) & (values <= hi + tolerance)]


class _CachedTexts(Artist):
    """Texts that every plot of a kind repeats (key, labels), blitted from a bitmap cache.

    Matplotlib's Agg text path costs about 0.1 ms per glyph, most of a small plot's time. These
    texts do not depend on the data, so under Agg they are rasterized once per (texts, canvas
    size, dpi) onto a transparent canvas, cut into one tile per text, and later drawn as images;
    any other renderer (PDF, SVG) draws the texts themselves. Same texts, same pixels.
    """

    _tiles: OrderedDict[tuple, list[tuple[int, int, np.ndarray]]] = OrderedDict()
    _limit = 64
    _lock = threading.Lock()

    def __init__(self, fig: Figure) -> None:
        super().__init__()
        self.set_figure(fig)
        self.texts: list[Text] = []
        self.set_zorder(3)

    def text(self, x: float, y: float, s: str, *, transform=None, **kwargs) -> Text:
        text = Text(x, y, s, **kwargs)
        text.set_figure(self.figure)
        text.set_transform(transform if transform is not None else self.figure.transFigure)
        self.texts.append(text)
        return text

    def get_children(self) -> list[Text]:
        return list(self.texts)

    def _key(self, renderer: RendererAgg) -> tuple:
        entries = []
        for text in self.texts:
            x, y = text.get_transform().transform(text.get_unitless_position())
            entries.append((
                text.get_text(), float(x), float(y), text.get_fontsize(),
                text.get_horizontalalignment(), text.get_verticalalignment(),
                text.get_rotation(), to_hex(text.get_color(), keep_alpha=True),
                str(text.get_fontweight()), tuple(text.get_fontfamily()),
                text.get_linespacing(), text.get_visible(), text.get_antialiased(),
            ))
        return (int(renderer.width), int(renderer.height), float(renderer.dpi),
                matplotlib.rcParams["text.hinting"], tuple(entries))

    def _rasterize(self, renderer: RendererAgg) -> list[tuple[int, int, np.ndarray]]:
        width, height = int(renderer.width), int(renderer.height)
        canvas = RendererAgg(width, height, renderer.dpi)
        boxes = []
        for text in self.texts:
            if text.get_visible() and text.get_text():
                text.draw(canvas)
                boxes.append(text.get_window_extent(canvas))
        pixels = np.asarray(canvas.buffer_rgba())
        regions = []
        for box in boxes:
            region = [max(int(box.x0) - 2, 0), max(int(box.y0) - 2, 0),
                      min(int(math.ceil(box.x1)) + 2, width), min(int(math.ceil(box.y1)) + 2, height)]
            # Overlapping tiles would blend their shared pixels twice: merge them.
            while (other := next((r for r in regions if _overlap(r, region)), None)) is not None:
                regions.remove(other)
                region = [min(region[0], other[0]), min(region[1], other[1]),
                          max(region[2], other[2]), max(region[3], other[3])]
            regions.append(region)
        tiles = []  # draw_image takes rows bottom-up
        for x0, y0, x1, y1 in regions:
            if x1 > x0 and y1 > y0:
                tiles.append((x0, y0, pixels[height - y1 : height - y0, x0:x1][::-1].copy()))
        return tiles

    def draw(self, renderer) -> None:
        if not self.get_visible():
            return
        if not isinstance(renderer, RendererAgg):
            for text in self.texts:
                text.draw(renderer)
            return
        key = self._key(renderer)
        with self._lock:
            tiles = self._tiles.get(key)
            if tiles is not None:
                self._tiles.move_to_end(key)
        if tiles is None:
            tiles = self._rasterize(renderer)
            with self._lock:
                self._tiles[key] = tiles
                while len(self._tiles) > self._limit:
                    self._tiles.popitem(last=False)
        gc = renderer.new_gc()
        for x, y, tile in tiles:
            renderer.draw_image(gc, x, y, tile)
        gc.restore()
        self.stale = False


def _overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _layer(fig: Figure) -> _CachedTexts:
    """The figure's cached-text layer (created on first use)."""
    for artist in fig.artists:
        if isinstance(artist, _CachedTexts):
            return artist
    layer = _CachedTexts(fig)
    fig.add_artist(layer)
    return layer


class _Frame:
    """A plotting area drawn straight on the figure: data transforms, clipping, ticks.

    Stands in for an ``Axes``: building one Axes (with its axis, tick and text artists) and
    drawing it costs more than everything else in these plots, and the plots need only a data
    transform, a clip box and a few ticks. ``y`` is in log10 units when ``log`` is set.
    """

    def __init__(self, fig: Figure, rect: Sequence[float], xlim: tuple[float, float],
                 ylim: tuple[float, float]) -> None:
        self.fig = fig
        self.rect = tuple(float(v) for v in rect)
        box = TransformedBbox(Bbox.from_bounds(*self.rect), fig.transFigure)
        self.clip = box
        self.area = BboxTransformTo(box)
        self.data = BboxTransformFrom(Bbox([[xlim[0], ylim[0]], [xlim[1], ylim[1]]])) + self.area
        self.xspan = blended_transform_factory(self.data, self.area)
        self.xlim, self.ylim = xlim, ylim
        width, height = fig.get_size_inches()
        self.inch_x = 1.0 / (self.rect[2] * width)
        self.inch_y = 1.0 / (self.rect[3] * height)

    def add(self, artist, *, transform=None, clip: bool = True, zorder: float = 1.0):
        artist.set_transform(transform if transform is not None else self.data)
        artist.set_zorder(zorder)
        if clip:
            artist.set_clip_box(self.clip)
        else:
            artist.set_clip_on(False)
        self.fig.add_artist(artist)
        return artist

    def text(self, x: float, y: float, s: str, *, transform=None, **kwargs):
        return self.fig.text(x, y, s, transform=transform or self.area, **kwargs)

    def fixed_text(self, x: float, y: float, s: str, *, transform=None, **kwargs):
        """A text that does not depend on the data (drawn through the cached layer)."""
        return _layer(self.fig).text(x, y, s, transform=transform or self.area, **kwargs)

    def spines(self) -> None:
        self.add(Line2D([0, 0, 1], [1, 0, 0], color="black", lw=0.8, solid_joinstyle="miter"),
                 transform=self.area, clip=False, zorder=2.5)

    def ticks(self, x_ticks: np.ndarray | None, y_ticks: np.ndarray, y_labels: list[str]) -> None:
        length_y, length_x = TICK_INCHES * self.inch_y, TICK_INCHES * self.inch_x
        if x_ticks is not None and x_ticks.size:
            self.add(Line2D(*_segments(x_ticks, 0, -length_y), color="black", lw=0.8),
                     transform=self.xspan, clip=False, zorder=2.5)
            for x, label in zip(x_ticks, _decimal_labels(x_ticks)):
                self.text(x, -1.7 * length_y, label, transform=self.xspan, ha="center",
                          va="top", fontsize=TICK_FONT)
        y_axes = (np.asarray(y_ticks, dtype=np.float64) - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        x, y = _segments(y_axes, 0, -length_x)
        self.add(Line2D(y, x, color="black", lw=0.8), transform=self.area, clip=False, zorder=2.5)
        for y_value, label in zip(y_axes, y_labels):
            self.text(-1.7 * length_x, y_value, label, ha="right", va="center",
                      fontsize=TICK_FONT)


def _y_scale(share: np.ndarray, *, log_scale: bool, top_share: float):
    """Plot-space y of shares, the y limits, and the y ticks with their labels."""
    if log_scale:
        positive = share[share > 0]
        low = float(positive.min()) * 0.5 if positive.size else 1e-6
        high = float(share.max()) * 3 if positive.size else 1.0
        ticks = _inside(LogLocator(numticks=6).tick_values(low, high), low, high)
        labels = [f"{100 * t:g}%".replace("-", MINUS) for t in ticks]
        with np.errstate(divide="ignore"):
            to_plot = lambda v: np.log10(np.maximum(np.asarray(v, dtype=np.float64), low))
        return to_plot, (math.log10(low), math.log10(high)), to_plot(ticks), labels
    high = top_share * 1.12 or 1.0
    ticks = _inside(MaxNLocator(4).tick_values(0.0, high), 0.0, high)
    return (lambda v: np.asarray(v, dtype=np.float64)), (0.0, high), ticks, \
        _decimal_labels(100 * ticks, suffix="%")


def _draw_panel(
    fig: Figure,
    rect: Sequence[float],
    view: HistogramView,
    values: np.ndarray,
    axis: _Axis,
    *,
    color: str,
    dark: str,
    log_scale: bool,
    ylabel: str,
    xlabel: str | None,
    level_labels: bool,
) -> _Frame:
    """One distribution on the grid: share per quantization level, smoothed curve, grid, clamps.

    The zero bin (often half of a ReLU output) is cut at the top of the panel with its share
    written beside it, so it does not flatten the rest of the distribution; ``log_scale`` shows
    everything instead.
    """
    grid = view.grid
    share = _share(_per_qbin(values, grid))
    q_edges = grid.first_qbin - 0.5 + np.arange(grid.n_qbins + 1, dtype=np.float64)
    x_edges = axis.x(q_edges)
    x_lo, x_hi = float(x_edges[0]), float(x_edges[-1])

    zero_index = _zero_levels(view) - grid.first_qbin
    zero_index = zero_index[(zero_index >= 0) & (zero_index < grid.n_qbins)]
    others = np.delete(share, zero_index)
    peak_other = float(others.max()) if others.size else 0.0
    zero_share = float(share[zero_index].sum()) if zero_index.size else 0.0
    clip_zero = not log_scale and peak_other > 0 and zero_share > 1.5 * peak_other
    smooth_input = share
    if clip_zero:
        smooth_input = share.copy()
        for i in zero_index:
            neighbours = share[max(i - 1, 0) : i + 2]
            smooth_input[i] = (neighbours.sum() - share[i]) / max(len(neighbours) - 1, 1)

    to_y, ylim, y_ticks, y_labels = _y_scale(
        share, log_scale=log_scale, top_share=peak_other if clip_zero else float(share.max())
    )
    frame = _Frame(fig, rect, (x_lo, x_hi), ylim)
    span = frame.xspan

    clamp_lo, clamp_hi = float(axis.x(grid.quant_min - 0.5)), float(axis.x(grid.quant_max + 0.5))
    frame.add(PolyCollection([[(x_lo, 0), (clamp_lo, 0), (clamp_lo, 1), (x_lo, 1)],
                              [(clamp_hi, 0), (x_hi, 0), (x_hi, 1), (clamp_hi, 1)]],
                             facecolors=CLAMP_COLOR, alpha=0.09, linewidths=0),
              transform=span, zorder=0.5)
    levels = axis.x(np.arange(grid.quant_min, grid.quant_max + 1, dtype=np.float64))
    frame.add(Line2D(*_segments(levels, 0, 0.035), color=GRID_COLOR, lw=0.4),
              transform=span, zorder=2.1)
    frame.add(Line2D(*_segments(axis.x(_major_levels(grid)), 0, 1), color="#bbbbbb", lw=0.5,
                     ls=(0, (2, 2))), transform=span, zorder=0.8)

    base = ylim[0]
    outline, polygon = _steps(x_edges, to_y(share), base)
    frame.add(PolyCollection([polygon], facecolors=color, alpha=0.45, linewidths=0), zorder=1)
    frame.add(Line2D(outline[:, 0], outline[:, 1], color=color, lw=0.7), zorder=1.5)
    smoothed = _smooth(smooth_input)
    if log_scale:
        smoothed = np.where(smoothed > 0, smoothed, np.nan)
    frame.add(Line2D(axis.x(q_edges[:-1] + 0.5), to_y(smoothed), color=dark, lw=1.3), zorder=2)

    extent = _data_extent_q(view, values)
    if extent is not None:
        xs = [float(axis.x(q)) for q in extent]
        frame.add(Line2D(*_segments(np.clip(xs, x_lo, x_hi), 0, 1), color=CLAMP_COLOR, lw=1.1,
                         ls=(0, (4, 2))), transform=span, zorder=2.2)
        for x_value, q_value, side in zip(xs, extent, ("min", "max")):
            if x_lo <= x_value <= x_hi:
                continue
            shown = _num(q_value if view.per_channel else x_value)
            text = f"{side} {shown} \u2192" if side == "max" else f"\u2190 {side} {shown}"
            frame.text(x_hi if side == "max" else x_lo, 0.5, text, transform=span, rotation=90,
                       fontsize=6.5, color=CLAMP_COLOR, va="center",
                       ha="right" if side == "max" else "left")

    if clip_zero:
        x_zero = float(axis.x(float(_zero_levels(view)[0])))
        frame.text(x_zero, 0.97, f" zero bin {_pct(zero_share)} \u2191", transform=span,
                   fontsize=7, color=dark, ha="left", va="top")
    if level_labels:
        for x, level, ha in ((clamp_lo, grid.quant_min, "left"), (clamp_hi, grid.quant_max, "right")):
            frame.fixed_text(x, 1.01, f"q={level}".replace("-", MINUS), transform=span, fontsize=6.5,
                       color=GRID_COLOR, ha=ha, va="bottom")

    x_ticks = None
    if xlabel is not None:
        x_ticks = _inside(MaxNLocator(6, integer=view.per_channel).tick_values(x_lo, x_hi),
                          x_lo, x_hi)
        frame.fixed_text(0.5, -0.33 * frame.inch_y, xlabel, ha="center", va="top",
                   fontsize=LABEL_FONT)
    frame.spines()
    frame.ticks(x_ticks, y_ticks, y_labels)
    frame.fixed_text(-0.55 * frame.inch_x, 0.5, ylabel, rotation=90, ha="center", va="center",
               fontsize=LABEL_FONT)
    return frame


def _draw_profile(fig: Figure, rect: Sequence[float], profile: np.ndarray,
                  stats: HistogramStats, *, color: str, dark: str, heading: str,
                  boxed: bool) -> None:
    """The mean intra-bin profile inset with the clamped / zero-bin / off-centroid masses.

    Bars are the share of in-range elements at each position inside a quantization bin (from
    half a step below a grid level to half a step above), the level's own sub-bin darker; the
    dashed line is what a uniform spread would give. The zero bin is left out of the profile
    and listed on its own. ``boxed`` puts a white card behind it, for insets placed over data.
    """
    left, bottom, width, height = (float(v) for v in rect)
    fig_w, fig_h = fig.get_size_inches()
    box = BboxTransformTo(TransformedBbox(Bbox.from_bounds(left, bottom, width, height),
                                          fig.transFigure))
    bins = len(profile)
    peak = max(float(profile.max()) if bins else 0.0, 1.0 / max(bins, 1))
    heights = profile / (peak * 1.15)
    bars = [[(i / bins, 0), ((i + 1) / bins, 0), ((i + 1) / bins, h), (i / bins, h)]
            for i, h in enumerate(heights)]
    colors = [dark if i == bins // 2 else color for i in range(bins)]
    fig.add_artist(PolyCollection(bars, facecolors=colors, alpha=0.85, linewidths=0,
                                  transform=box, zorder=3))
    uniform = 1.0 / (bins * peak * 1.15)
    fig.add_artist(Line2D([0, 1], [uniform, uniform], color="#222222", lw=0.7, ls=(0, (3, 2)),
                          transform=box, zorder=3.1))
    fig.add_artist(Line2D([0, 0, 1, 1], [1, 0, 0, 1], color="#333333", lw=0.7, transform=box,
                          zorder=3.1))
    lines = [
        f"clamped {_pct(stats.clamped)}",
        f"  below {_pct(stats.clamped_below)}, above {_pct(stats.clamped_above)}",
        f"zero bin {_pct(stats.zero_bin)}",
        f"off-centroid {_pct(stats.off_centroid)}",
    ]
    if stats.has_nonfinite:
        lines.append(f"NaN {stats.nan_count:,}, inf {stats.inf_count:,}")
    title_y = bottom + height + 0.06 / fig_h
    ticks_y = bottom - 0.04 / fig_h
    stats_y = bottom - 0.25 / fig_h
    fixed = _layer(fig)
    fixed.text(left, title_y, f"{heading}: mean intra-bin profile", fontsize=7.2, va="bottom",
             ha="left", zorder=3.2)
    fixed.text(left, ticks_y, f"{MINUS}\u00bd step", fontsize=6.5, va="top", ha="left", zorder=3.2)
    fixed.text(left + width, ticks_y, "+\u00bd step", fontsize=6.5, va="top", ha="right",
             zorder=3.2)
    fig.text(left, stats_y, "\n".join(lines), fontsize=7, va="top", ha="left", linespacing=1.35,
             zorder=3.2)
    if boxed:
        pad_x, pad_y = 0.06 / fig_w, 0.05 / fig_h
        chars = max(len(f"{heading}: mean intra-bin profile"), *(len(s) for s in lines))
        text_width = chars * 7 * 0.56 / 72 / fig_w
        top = title_y + 0.14 / fig_h + pad_y
        low = stats_y - len(lines) * 7 * 1.35 / 72 / fig_h - pad_y
        fig.add_artist(Rectangle((left - pad_x, low), max(width, text_width) + 2 * pad_x,
                                 top - low, facecolor="white", edgecolor="#cccccc", lw=0.6,
                                 alpha=0.92, transform=fig.transFigure, zorder=2.9))


def _grid_caption(view: HistogramView, numel: int) -> str:
    grid = view.grid
    levels = grid.quant_max - grid.quant_min + 1
    if view.per_channel:
        qparams = (f"{view.scale.size} channels, scale {_num(view.scale.min())} "
                   f"to {_num(view.scale.max())}")
    else:
        qparams = f"scale {_num(float(view.scale[0]))}, zero point {int(view.zero_point[0])}"
    bounds = f"[{grid.quant_min}, {grid.quant_max}]".replace("-", MINUS)
    return f"{levels}-level grid q \u2208 {bounds}, {qparams}, {numel:,} elements"


def _draw_legend(fig: Figure, *, sensitivity: bool, y: float) -> None:
    """A one-row key; cheaper than ``Figure.legend``, which measures and boxes its entries."""
    entries = [("patch", FORWARD_COLOR, "tensor")]
    if sensitivity:
        entries.append(("patch", GRAD_COLOR, "|gradient|"))
    entries += [
        ("line", "#222222", f"smoothed ({SMOOTH_QBINS} levels)"),
        ("rug", GRID_COLOR, "grid levels"),
        ("dashed", CLAMP_COLOR, "tensor range"),
        ("shade", CLAMP_COLOR, "clamped"),
    ]
    width, height = 0.022, 0.018
    char = 7 * 0.58 / 72 / fig.get_size_inches()[0]
    x = MAIN_LEFT
    for kind, color, label in entries:
        if kind in ("patch", "shade"):
            fig.add_artist(Rectangle((x, y - height / 2), width, height, facecolor=color,
                                     alpha=0.55 if kind == "patch" else 0.18, lw=0,
                                     transform=fig.transFigure))
        elif kind == "rug":
            fig.add_artist(Line2D(*_segments(np.linspace(x, x + width, 6), y - height / 2,
                                             y + height / 2),
                                  color=color, lw=0.6, transform=fig.transFigure))
        else:
            fig.add_artist(Line2D([x, x + width], [y, y], color=color, lw=1.3,
                                  ls="-" if kind == "line" else (0, (3, 1.5)),
                                  transform=fig.transFigure))
        _layer(fig).text(x + width + 0.006, y, label, fontsize=7, va="center", ha="left")
        x += width + 0.006 + len(label) * char + 0.03


def _xlabel(view: HistogramView, tensor_kind: str) -> str:
    if view.per_channel:
        return f"{tensor_kind.lower()} on the integer grid (q = x / scale + zero point, per channel)"
    return f"{tensor_kind.lower()} value"


def _new_figure(figsize: Sequence[float], dpi: float) -> Figure:
    fig = Figure(figsize=tuple(figsize), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _header(fig: Figure, title: str, caption: str, *, sensitivity: bool) -> None:
    fig.text(0.012, 0.985, title, fontsize=10, weight="bold", va="top")
    fig.text(0.012, 0.945, caption, fontsize=7.5, color="#444444", va="top")
    _draw_legend(fig, sensitivity=sensitivity, y=0.9)


def render_hist(
    hist: Any,
    *,
    title: str = "",
    tensor_kind: str = "Activation",
    sum_pos: Sequence[float] | None = None,
    log_scale: bool = False,
    figsize: Sequence[float] = DEFAULT_FIGSIZE,
    dpi: float = DEFAULT_DPI,
) -> Figure:
    """QTH: one tensor's distribution on its quantization grid, with the intra-bin inset.

    ``hist`` is anything :meth:`HistogramView.of` takes. ``sum_pos`` places the inset in
    figure fractions ``[left, bottom, width, height]`` as in the seed; None puts it in the side
    panel, clear of the data.
    """
    view = HistogramView.of(hist)
    with plot_style():
        fig = _new_figure(figsize, dpi)
        stats = view.stats()
        _draw_panel(fig, (MAIN_LEFT, 0.12, MAIN_WIDTH, 0.7), view, view.counts, _Axis(view),
                    color=FORWARD_COLOR, dark=FORWARD_DARK, log_scale=log_scale,
                    level_labels=True, ylabel="share of elements per grid level",
                    xlabel=_xlabel(view, tensor_kind))
        _draw_profile(fig, sum_pos or (SIDE_LEFT, 0.52, SIDE_WIDTH, 0.2),
                      _profile(view.counts, view), stats, color=FORWARD_COLOR,
                      dark=FORWARD_DARK, heading=tensor_kind, boxed=sum_pos is not None)
        _header(fig, title, _grid_caption(view, stats.numel), sensitivity=False)
    return fig


def render_sa_hist(
    forward: Any,
    grads: GradientHistogram | np.ndarray | None = None,
    *,
    title: str = "",
    tensor_kind: str = "Activation",
    sum_pos_1: Sequence[float] | None = None,
    sum_pos_2: Sequence[float] | None = None,
    log_scale: bool = False,
    figsize: Sequence[float] = DEFAULT_SA_FIGSIZE,
    dpi: float = DEFAULT_DPI,
) -> Figure:
    """SA: the forward distribution (top) and the gradient magnitude per level (below).

    Both panels share the grid and x range. The gradient panel shows |sum of gradients| per
    histogram bin as a share of the total: how much each quantization bin contributed to the
    output for the data that produced it. ``sum_pos_1``/``sum_pos_2`` place the forward and
    gradient insets as in the seed (figure fractions); None puts them in the side panel.
    """
    view = HistogramView.of(forward, grads)
    with plot_style():
        fig = _new_figure(figsize, dpi)
        axis = _Axis(view)
        stats = view.stats()
        _draw_panel(fig, (MAIN_LEFT, 0.5, MAIN_WIDTH, 0.35), view, view.counts, axis,
                    color=FORWARD_COLOR, dark=FORWARD_DARK, log_scale=log_scale,
                    level_labels=True, ylabel="share of elements", xlabel=None)
        _draw_profile(fig, sum_pos_1 or (SIDE_LEFT, 0.66, SIDE_WIDTH, 0.14),
                      _profile(view.counts, view), stats, color=FORWARD_COLOR,
                      dark=FORWARD_DARK, heading=tensor_kind, boxed=sum_pos_1 is not None)
        grad_stats = view.grad_stats()
        has_grads = grad_stats is not None and bool(np.any(view.binned_grads))
        magnitude = np.abs(view.binned_grads) if has_grads else np.zeros_like(view.counts)
        bottom = _draw_panel(fig, (MAIN_LEFT, 0.1, MAIN_WIDTH, 0.35), view, magnitude, axis,
                             color=GRAD_COLOR, dark=GRAD_DARK, log_scale=log_scale and has_grads,
                             level_labels=False, ylabel="share of |gradient|",
                             xlabel=_xlabel(view, tensor_kind))
        if has_grads:
            _draw_profile(fig, sum_pos_2 or (SIDE_LEFT, 0.25, SIDE_WIDTH, 0.14),
                          _profile(magnitude, view), grad_stats, color=GRAD_COLOR,
                          dark=GRAD_DARK, heading="|Gradient|", boxed=sum_pos_2 is not None)
        else:
            bottom.fixed_text(0.5, 0.5, "no gradients recorded for this tensor", ha="center",
                        va="center", color="#888888")
        _header(fig, title, _grid_caption(view, stats.numel), sensitivity=True)
    return fig


def figure_to_png(fig: Figure, *, dpi: float | None = None) -> bytes:
    """PNG bytes of ``fig`` under the fixed style, without metadata that varies between runs.

    Written as 8-bit RGB through Pillow (the figures are opaque), which is about twice as fast
    to encode as matplotlib's RGBA PNG.
    """
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    with plot_style():
        if dpi is not None and dpi != fig.dpi:
            fig.set_dpi(dpi)
        canvas = fig.canvas
        canvas.draw()
        width, height = canvas.get_width_height(physical=True)
        image = Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA",
                                 0, 1).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="png", compress_level=PNG_COMPRESS_LEVEL, dpi=(fig.dpi, fig.dpi))
    return buffer.getvalue()


def save_figure(
    fig: Figure, path: str | os.PathLike[str] | BinaryIO, *, dpi: float | None = None,
    close: bool = True,
) -> Path | BinaryIO:
    """Write ``fig`` as a deterministic PNG at ``path`` (atomically), then release the figure.

    The file is written to a temporary name next to ``path`` and renamed, so readers never see
    a half-written image. ``path`` may also be a binary stream, which gets the bytes (for bytes
    alone, :func:`figure_to_png`). ``close=False`` keeps the figure for further use.
    """
    data = figure_to_png(fig, dpi=dpi)
    if close:
        close_figure(fig)
    if hasattr(path, "write"):
        path.write(data)
        return path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def close_figure(fig: Figure) -> None:
    """Drop ``fig``'s artists; also unregister it from pyplot if pyplot made it."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and pyplot.fignum_exists(getattr(fig, "number", -1)):
        pyplot.close(fig)
    fig.clear()
