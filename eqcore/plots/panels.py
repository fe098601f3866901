"""Panel drawing: one distribution on its quantization grid and the intra-bin profile inset.

:func:`_draw_panel` draws the share per quantization level, the smoothed curve, the grid and
the clamped ranges in a :class:`~eqcore.plots.frame._Frame`, one path per family of lines;
:func:`_draw_profile` draws the mean intra-bin profile with the clamped / zero-bin /
off-centroid masses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Bbox, BboxTransformTo, TransformedBbox

from eqcore.analysis.histograms import HistogramStats
from eqcore.plots.frame import _Frame, _inside, _segments, _y_scale
from eqcore.plots.style import CLAMP_COLOR, GRID_COLOR, LABEL_FONT, MINUS
from eqcore.plots.texts import _layer
from eqcore.plots.view import (
    HistogramView,
    _Axis,
    _data_extent_q,
    _major_levels,
    _per_qbin,
    _share,
    _smooth,
    _zero_levels,
)

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


def _steps(x_edges: np.ndarray, heights: np.ndarray, base: float) -> tuple[np.ndarray, np.ndarray]:
    """Outline and filled polygon of a step histogram."""
    outline = np.column_stack([np.repeat(x_edges, 2)[1:-1], np.repeat(heights, 2)])
    polygon = np.vstack([[x_edges[0], base], outline, [x_edges[-1], base]])
    return outline, polygon


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
