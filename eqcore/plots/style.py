"""The fixed look of every eqcore figure: sizes, colours, fonts, layout and rcParams.

Figures are drawn under :data:`PLOT_STYLE` through :func:`plot_style`, a context around each
render, so the same data always gives the same pixels and the user's backend and rcParams are
left alone. The geometry is fixed (no ``tight_layout``), which keeps a plot to tens of
milliseconds.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import matplotlib.style

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


@contextmanager
def plot_style():
    """Matplotlib's defaults plus :data:`PLOT_STYLE`, for the duration of the block only."""
    with matplotlib.style.context(("default", PLOT_STYLE)):
        yield
