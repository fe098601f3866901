"""The per-layer sensitivity bar plot, compared with its pytest-mpl baseline image."""

from __future__ import annotations

import math

import pytest

from eqcore import LayerSensitivity, SensitivityReport, render_sensitivity
from eqcore.analysis.metrics import Fidelity
from eqcore.plots.style import PLOT_STYLE

image_compare = pytest.mark.mpl_image_compare(
    baseline_dir="../baselines/mpl",
    style=("default", PLOT_STYLE),
    savefig_kwargs={"metadata": {"Software": None}},
)


def _report() -> SensitivityReport:
    """Five layers: one without any error (+inf, drawn at the top), one without a leave-one-out value."""
    values = [
        ("conv1", 31.5, 22.0, 3), ("layer1.0.conv1", 44.2, 21.4, 4), ("layer1.0.conv2", math.inf, 21.0, 5),
        ("layer2.0.downsample.0", 26.8, math.nan, 1), ("fc", 28.3, 23.9, 2),
    ]
    order = sorted(range(len(values)), key=lambda i: values[i][1])
    rows = tuple(
        LayerSensitivity(name=name, quantizers=(f"{name}.weight_fake_quant", f"activation_post_process_{i}"),
                         isolated_sqnr_db=iso, leave_one_out_sqnr_db=loo, local_sqnr_db=iso - 3,
                         cumulative_sqnr_db=iso - 8, sa_score=1.0 / sa_rank, sweep_rank=order.index(i) + 1,
                         sa_rank=sa_rank)
        for i, (name, iso, loo, sa_rank) in enumerate(values)
    )
    all_on = Fidelity(sqnr_db=20.5, cosine_similarity=0.99, top1_agreement=1.0, kl_divergence=0.01)
    return SensitivityReport(layers=rows, all_quantizers=all_on, weights_only=all_on, activations_only=all_on,
                             spearman=0.7, other_quantizers=(), batches=1, samples=8)


@image_compare
def test_sensitivity_bars_image():
    return render_sensitivity(_report(), title="resnet18 w4a8")


def test_infinite_and_missing_values_are_drawn_at_the_top_and_zero():
    figure = render_sensitivity(_report())
    ax = figure.axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    isolated, leave_one_out = heights[:5], heights[5:]
    assert isolated[2] > max(isolated[:2] + isolated[3:]) and math.isfinite(isolated[2])
    assert leave_one_out[3] == 0.0
    assert [t.get_text() for t in ax.texts] == ["SA 3", "SA 4", "SA 5\n(\u221e dB: no error)", "SA 1", "SA 2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [row.name for row in _report().layers]
