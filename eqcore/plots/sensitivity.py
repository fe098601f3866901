"""The per-layer sensitivity bar plot: which layer breaks the model, and does SA agree.

One pair of bars per layer in model order: the logits' SQNR with only that layer quantized
(isolated) and with every layer but it quantized (leave-one-out); the dashed line is every
quantizer on. Above each pair, the layer's SA-score rank (1 = the largest score), so a user
sees at a glance whether the one-pass score points at the same layers as the sweep.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from eqcore.analysis.sensitivity import SensitivityReport
from eqcore.plots.style import CLAMP_COLOR, DEFAULT_DPI, FORWARD_COLOR, GRAD_COLOR, GRID_COLOR, plot_style

__all__ = ["render_sensitivity"]


def _drawable(values: list[float], ceiling: float) -> np.ndarray:
    """Finite bar heights: +inf (no error at all) at the ceiling, labelled; NaN (not measured) as 0."""
    return np.array([ceiling if v == math.inf else 0.0 if math.isnan(v) else v for v in values])


def render_sensitivity(report: SensitivityReport, *, title: str = "") -> Figure:
    """The bar plot of ``report``, as a matplotlib Figure (not registered with pyplot)."""
    rows = report.layers
    isolated = [row.isolated_sqnr_db for row in rows]
    leave_one_out = [row.leave_one_out_sqnr_db for row in rows]
    finite = [v for v in isolated + leave_one_out + [report.all_quantizers.sqnr_db] if math.isfinite(v)]
    top = max(finite, default=1.0)
    bottom = min(0.0, min(finite, default=0.0))
    ceiling = top + 0.1 * (top - bottom or 1.0)
    x = np.arange(len(rows))
    width = 0.4
    longest = max((len(row.name) for row in rows), default=4)
    bottom_margin = min(0.4, 0.06 + 0.0095 * longest)
    with plot_style():
        fig = Figure(figsize=(max(8.0, 2.0 + 0.42 * len(rows)), 5.0), dpi=DEFAULT_DPI)
        ax = fig.add_axes((0.08, bottom_margin, 0.9, 0.78 - bottom_margin))
        ax.bar(x - width / 2, _drawable(isolated, ceiling), width, color=FORWARD_COLOR,
               label="isolated: only this layer quantized")
        ax.bar(x + width / 2, _drawable(leave_one_out, ceiling), width, color=GRAD_COLOR,
               label="leave-one-out: every layer but this one")
        all_db = report.all_quantizers.sqnr_db
        if math.isfinite(all_db):
            ax.axhline(all_db, color=CLAMP_COLOR, linestyle="--", linewidth=0.9,
                       label=f"every quantizer on: {all_db:.1f} dB")
        heights = np.maximum(_drawable(isolated, ceiling), _drawable(leave_one_out, ceiling))
        for index, row in enumerate(rows):
            label = f"SA {row.sa_rank}"
            if math.inf in (row.isolated_sqnr_db, row.leave_one_out_sqnr_db):
                label += "\n(\u221e dB: no error)"
            ax.text(index, heights[index] + 0.01 * (ceiling - bottom), label,
                    ha="center", va="bottom", fontsize=6.5, color=GRID_COLOR)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_ylim(bottom, ceiling + 0.08 * (ceiling - bottom))
        ax.set_xticks(x)
        ax.set_xticklabels([row.name for row in rows], rotation=55, ha="right", fontsize=7.0)
        ax.set_ylabel("logits SQNR vs float (dB)")
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, fontsize=7.0, frameon=False)
        rho = "n/a" if math.isnan(report.spearman) else f"{report.spearman:.2f}"
        heading = (
            "per-layer sensitivity: the lower the bar, the more sensitive the layer; SA n = rank of its SA score\n"
            f"Spearman(SA score, isolated sweep) = {rho}"
        )
        fig.text(0.5, 0.975, f"{title}\n{heading}" if title else heading, ha="center", va="top", fontsize=8.5)
    return fig
