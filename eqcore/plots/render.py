"""Assembly of QTH and sensitivity-analysis figures from plain histogram data.

Everything here is a pure function of a :class:`~eqcore.plots.view.HistogramView` (arrays, no
torch objects), drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot
state, no global backend switch, and a fixed style applied through a context, so the same data
always gives the same pixels. :func:`render_hist`, :func:`render_sa_hist`,
:func:`render_act_hist` and :func:`render_weight_hist` turn one histogram (a
:class:`TensorHistogram`, a hooks result, or a view rebuilt from stored arrays) into a
``Figure``: panels, insets, header, caption and key laid out on a fixed geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from eqcore.analysis.histograms import GradientHistogram
from eqcore.plots.frame import _segments
from eqcore.plots.panels import _draw_panel, _draw_profile, _num
from eqcore.plots.style import (
    CLAMP_COLOR,
    DEFAULT_DPI,
    DEFAULT_FIGSIZE,
    DEFAULT_SA_FIGSIZE,
    FORWARD_COLOR,
    FORWARD_DARK,
    GRAD_COLOR,
    GRAD_DARK,
    GRID_COLOR,
    MAIN_LEFT,
    MAIN_WIDTH,
    MINUS,
    SIDE_LEFT,
    SIDE_WIDTH,
    SMOOTH_QBINS,
    plot_style,
)
from eqcore.plots.texts import _layer
from eqcore.plots.view import HistogramView, _Axis, _profile

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


def render_act_hist(hist: Any, *, title: str = "", sum_pos: Sequence[float] | None = None,
                    log_scale: bool = False, figsize: Sequence[float] = DEFAULT_FIGSIZE,
                    dpi: float = DEFAULT_DPI) -> Figure:
    """QTH figure of one activation histogram (see :func:`eqcore.plots.render.render_hist`)."""
    return render_hist(hist, title=title, tensor_kind="Activation", sum_pos=sum_pos,
                       log_scale=log_scale, figsize=figsize, dpi=dpi)


def render_weight_hist(hist: Any, *, title: str = "", sum_pos: Sequence[float] | None = None,
                       log_scale: bool = False, figsize: Sequence[float] = DEFAULT_FIGSIZE,
                       dpi: float = DEFAULT_DPI) -> Figure:
    """QTH figure of one weight histogram (per-channel weights are drawn on the integer grid)."""
    return render_hist(hist, title=title, tensor_kind="Weight", sum_pos=sum_pos,
                       log_scale=log_scale, figsize=figsize, dpi=dpi)
