"""PNG bytes of a generated suite's plots, drawn from the run's typed SA results."""

from __future__ import annotations

from typing import Any


def render_check_plot(run: Any, target: str) -> bytes:
    """``act-sa-<quantizer>`` or ``weight-sa-<module>``: the SA plot of that tensor; ``sensitivity``:
    the per-layer sensitivity bars."""
    from eqcore.plots.png import close_figure, figure_to_png
    from eqcore.plots.render import render_sa_hist

    if target == "sensitivity":
        from eqcore.plots.sensitivity import render_sensitivity

        figure = render_sensitivity(run.sensitivity, title=f"{run.request.model} {run.request.recipe}")
        try:
            return figure_to_png(figure)
        finally:
            close_figure(figure)
    kind, _, name = target.partition("-sa-")
    if kind == "act":
        result, tensor_kind = run.sa.activations[name], "Activation"
    else:
        result, tensor_kind = run.sa.weights[name], "Weight"
    title = f"{run.request.model} {run.request.recipe}: {name}"
    figure = render_sa_hist(result.histogram, result.gradients, title=title, tensor_kind=tensor_kind)
    try:
        return figure_to_png(figure)
    finally:
        close_figure(figure)
