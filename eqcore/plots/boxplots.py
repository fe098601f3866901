"""Per-output-channel boxplots of a weight tensor, with the seeds' ``per_channel_boxplots`` API.

The seed's function and arguments, drawn on a bare Agg figure under the fixed style and
optionally written to ``<file_path>/With_CLE/<title>.png`` (or ``Without_CLE``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from eqcore.errors import EQError
from eqcore.plots.jobs import _UNSAFE, _check_folder
from eqcore.plots.png import save_figure
from eqcore.plots.style import DEFAULT_DPI, plot_style

__all__ = ["per_channel_boxplots"]

def _box_statistics(weights: torch.Tensor) -> dict[str, np.ndarray]:
    """Quartiles, Tukey whiskers (1.5 IQR, clipped to the data) and outliers per row."""
    q1, median, q3 = torch.quantile(weights, torch.tensor([0.25, 0.5, 0.75], dtype=weights.dtype),
                                    dim=1)
    iqr = q3 - q1
    low_bound, high_bound = (q1 - 1.5 * iqr)[:, None], (q3 + 1.5 * iqr)[:, None]
    inf = torch.tensor(float("inf"), dtype=weights.dtype)
    low = torch.where(weights >= low_bound, weights, inf).amin(dim=1)
    high = torch.where(weights <= high_bound, weights, -inf).amax(dim=1)
    outside = (weights < low_bound) | (weights > high_bound)
    rows, cols = torch.nonzero(outside, as_tuple=True)
    return {
        "q1": q1.numpy(), "median": median.numpy(), "q3": q3.numpy(),
        "low": low.numpy(), "high": high.numpy(),
        "outlier_x": rows.numpy(), "outlier_y": weights[rows, cols].numpy(),
    }


def per_channel_boxplots(
    weight_tensor: torch.Tensor,
    title: str,
    CLE: bool,
    *,
    file_path: str | os.PathLike[str] | None = None,
    figsize: Sequence[float] = (10.0, 6.0),
    dpi: float = DEFAULT_DPI,
) -> Figure:
    """Per-output-channel boxplots of a weight tensor, to compare channels' dynamic ranges.

    Returns the figure; with ``file_path`` (a folder) it is also written to
    ``file_path/With_CLE/<title>.png`` (or ``Without_CLE``). Boxes are the quartiles, whiskers
    reach the furthest weight within 1.5 IQR, dots are the weights beyond; all channels are
    drawn as a handful of collections, so wide layers stay fast.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PolyCollection
    from matplotlib.lines import Line2D

    if not isinstance(weight_tensor, torch.Tensor) or weight_tensor.dim() < 1 or weight_tensor.numel() == 0:
        raise EQError("weight_tensor must be a non-empty tensor with output channels on dim 0")
    weights = weight_tensor.detach().to("cpu", torch.float64).reshape(weight_tensor.shape[0], -1)
    stats = _box_statistics(weights)
    channels = weights.shape[0]
    x = np.arange(channels, dtype=np.float64)
    half = 0.3
    cle_name = "With_CLE" if CLE else "Without_CLE"
    with plot_style():
        fig = Figure(figsize=tuple(figsize), dpi=dpi)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.08, 0.1, 0.9, 0.82))
        boxes = [[(c - half, lo), (c + half, lo), (c + half, hi), (c - half, hi)]
                 for c, lo, hi in zip(x, stats["q1"], stats["q3"])]
        ax.add_collection(PolyCollection(boxes, facecolors="#cfe0f1", edgecolors="#1f4e79",
                                         linewidths=0.6), autolim=False)

        def segments(x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray) -> Line2D:
            xs = np.column_stack([x0, x1, np.full_like(x0, np.nan)]).ravel()
            ys = np.column_stack([y0, y1, np.full_like(y0, np.nan)]).ravel()
            return Line2D(xs, ys)

        for low_end, high_end in ((stats["low"], stats["q1"]), (stats["q3"], stats["high"])):
            ax.add_line(segments(x, x, low_end, high_end)).set(color="#1f4e79", lw=0.6)
        for level in (stats["low"], stats["high"]):
            ax.add_line(segments(x - half / 2, x + half / 2, level, level)).set(color="#1f4e79",
                                                                                 lw=0.6)
        ax.add_line(segments(x - half, x + half, stats["median"], stats["median"])).set(
            color="#d95f02", lw=1.0)
        ax.plot(stats["outlier_x"], stats["outlier_y"], ls="", marker="o", markersize=1.5,
                color="#555555", alpha=0.6)
        lo = float(min(stats["low"].min(), stats["outlier_y"].min(initial=np.inf)))
        hi = float(max(stats["high"].max(), stats["outlier_y"].max(initial=-np.inf)))
        pad = 0.05 * (hi - lo) or 1.0
        ax.set_xlim(-0.5 - 0.2 * half, channels - 0.5 + 0.2 * half)
        ax.set_ylim(lo - pad, hi + pad)
        ax.xaxis.set_major_locator(MaxNLocator(min(channels, 16), integer=True))
        ax.axhline(0.0, color="#999999", lw=0.6, zorder=0)
        ax.set_title(f"{cle_name}, {title}, Per-Output-Channel Weight Boxplots")
        ax.set_xlabel("Output Channel")
        ax.set_ylabel("Weight Value")
    if file_path is not None:
        folder = _check_folder(file_path) / cle_name
        name = _UNSAFE.sub("-", str(title)).strip() or "unnamed"
        save_figure(fig, folder / f"{name}.png", close=False)
    return fig
