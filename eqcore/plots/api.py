"""QTH and sensitivity-analysis plots with the seeds' API.

``plot_quant_act_hist``, ``plot_quant_act_SA_hist`` and ``plot_quant_weight_hist`` keep the
seeds' names and arguments and write the seeds' files (laid out by :mod:`eqcore.plots.jobs`),
drawing them through :func:`~eqcore.plots.jobs.render_many`. Figures are built on
``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, and no change to the user's backend
or rcParams (the fixed style is a context around each render).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eqcore.errors import EQError
from eqcore.analysis.histograms import GradientHistogram, TensorHistogram
from eqcore.plots.jobs import NameMapping, PlotJob, _check_folder, _unique_paths, plot_path, render_many
from eqcore.plots.style import DEFAULT_DPI
from eqcore.plots.view import HistogramView

__all__ = [
    "plot_quant_act_SA_hist",
    "plot_quant_act_hist",
    "plot_quant_weight_hist",
]

logger = logging.getLogger(__name__)

ConditionsMet = Callable[[torch.nn.Module, str], bool]


def _title(kind: str, plot_title: str | None, name: str) -> str:
    return f"{kind} - {plot_title} - {name}" if plot_title else f"{kind} - {name}"


def _display_name(name: str, module_name_mapping: NameMapping | None) -> str:
    return str(module_name_mapping(name)) if module_name_mapping else name


def _position(pos: Sequence[float] | None, name: str) -> tuple[float, ...] | None:
    if pos is None:
        return None
    values = tuple(float(v) for v in pos)
    if len(values) != 4 or not all(math.isfinite(v) for v in values) or min(values[2:]) <= 0:
        raise EQError(
            f"{name} must be [left, bottom, width, height] in figure fractions with a positive "
            f"width and height, got {list(pos)!r}"
        )
    return values


def _warn_bit_res(hist: TensorHistogram | HistogramView, bit_res: int | None, name: str) -> None:
    if bit_res is None:
        return
    levels = hist.grid.quant_max - hist.grid.quant_min + 1
    if levels != 2**bit_res:
        logger.warning(
            "%s was histogrammed on a %d-level grid; bit_res=%d here cannot change that (pass "
            "bit_res to the hooks instead)", name, levels, bit_res,
        )


def _render_options(log_scale: bool, figsize: Sequence[float] | None, dpi: float) -> dict[str, Any]:
    return {"log_scale": bool(log_scale), "figsize": tuple(figsize) if figsize else None,
            "dpi": float(dpi)}


def plot_quant_act_hist(
    act_forward_histograms: Any,
    file_path: str | os.PathLike[str],
    plot_title: str | None = None,
    module_name_mapping: NameMapping | None = None,
    sum_pos_1: Sequence[float] | None = None,
    bit_res: int = 8,
    *,
    log_scale: bool = False,
    workers: int | None = None,
    figsize: Sequence[float] | None = None,
    dpi: float = DEFAULT_DPI,
) -> list[Path]:
    """QTH of every activation in ``act_forward_histograms`` (an ``ActHistogram``), then reset it.

    Writes ``file_path/activations/hists/Act-hist-<name>.png`` per module and returns the
    paths. As in the seed, the ``ActHistogram`` is reset afterwards (hooks removed, data
    cleared); on an error it is left as it was. ``bit_res`` is accepted for the seed's sake:
    the grid was fixed when the hooks binned the data.
    """
    folder = _check_folder(file_path)
    data: Mapping[str, Any] = act_forward_histograms.data
    if not data:
        logger.warning("no activation histograms were stored; nothing to plot")
        return []
    position = _position(sum_pos_1, "sum_pos_1")
    options = _render_options(log_scale, figsize, dpi)
    jobs = []
    for name, hist in data.items():
        _warn_bit_res(hist, bit_res, name)
        jobs.append(PlotJob(
            path=plot_path(folder, "act", name, module_name_mapping),
            view=HistogramView.of(hist),
            title=_title("Activation", plot_title, _display_name(name, module_name_mapping)),
            tensor_kind="Activation", sum_pos_1=position, **options,
        ))
    paths = render_many(_unique_paths(jobs), workers=workers)
    act_forward_histograms.reset()
    return paths


def plot_quant_act_SA_hist(
    act_forward_histograms: Any,
    act_backward_histograms: Any,
    file_path: str | os.PathLike[str],
    sum_pos_1: Sequence[float] | None = None,
    sum_pos_2: Sequence[float] | None = None,
    plot_title: str | None = None,
    module_name_mapping: NameMapping | None = None,
    bit_res: int = 8,
    *,
    log_scale: bool = False,
    workers: int | None = None,
    figsize: Sequence[float] | None = None,
    dpi: float = DEFAULT_DPI,
) -> list[Path]:
    """SA plots: each activation's histogram beside the gradients binned on the same grid.

    Writes ``file_path/activations/sensitivity_analysis/SA-Act-hist-<name>.png`` per module
    and returns the paths; then resets both ``ActHistogram`` objects (hooks removed, data
    cleared), as in the seed. ``sum_pos_1``/``sum_pos_2`` place the forward/gradient insets in
    figure fractions (None: a side panel clear of the data).
    """
    folder = _check_folder(file_path)
    forward: Mapping[str, Any] = act_forward_histograms.data
    backward: Mapping[str, Any] = act_backward_histograms.data
    if not forward:
        logger.warning("no activation histograms were stored; nothing to plot")
        return []
    positions = _position(sum_pos_1, "sum_pos_1"), _position(sum_pos_2, "sum_pos_2")
    options = _render_options(log_scale, figsize, dpi)
    jobs = []
    for name, hist in forward.items():
        _warn_bit_res(hist, bit_res, name)
        grads = backward.get(name)
        if grads is None:
            logger.warning("no gradients were recorded for %s (did the backward pass reach "
                           "it?); its SA plot shows the forward histogram only", name)
        elif not isinstance(grads, (GradientHistogram, np.ndarray)):
            raise EQError(
                f"act_backward_histograms.data[{name!r}] is a {type(grads).__name__}, not a "
                "GradientHistogram; pass the second result of add_sensitivity_analysis_hooks"
            )
        jobs.append(PlotJob(
            path=plot_path(folder, "act_sa", name, module_name_mapping),
            view=HistogramView.of(hist, grads),
            title=_title("Sensitivity analysis", plot_title,
                         _display_name(name, module_name_mapping)),
            tensor_kind="Activation", sensitivity=True, sum_pos_1=positions[0],
            sum_pos_2=positions[1], **options,
        ))
    paths = render_many(_unique_paths(jobs), workers=workers)
    act_forward_histograms.reset()
    act_backward_histograms.reset()
    return paths


def plot_quant_weight_hist(
    model: torch.nn.Module,
    file_path: str | os.PathLike[str],
    plot_title: str | None = None,
    module_name_mapping: NameMapping | None = None,
    conditions_met: ConditionsMet | None = None,
    sum_pos_1: Sequence[float] | None = None,
    sum_pos_2: Sequence[float] | None = None,
    sensitivity_analysis: bool = False,
    bit_res: int = 8,
    *,
    log_scale: bool = False,
    workers: int | None = None,
    figsize: Sequence[float] | None = None,
    dpi: float = DEFAULT_DPI,
) -> list[Path]:
    """QTH of every quantized weight (modules with a ``weight_fake_quant``), optionally with SA.

    Weights are binned by :func:`eqcore.analysis.weights.weight_histograms` on their quantizer's grid
    (``bit_res`` sets its resolution). Writes ``file_path/weights/hists/Weight-hist-<name>.png``,
    or with ``sensitivity_analysis`` (the weights' ``.grad`` from a backward you ran, binned on
    the same grid) ``file_path/weights/sensitivity_analysis/Weight-hist-<name>.png``; ``<name>``
    is the module's name through ``module_name_mapping``. Returns the paths.
    """
    from eqcore.analysis.weights import weight_histograms

    folder = _check_folder(file_path)
    results = weight_histograms(model, conditions_met=conditions_met, bit_res=bit_res,
                                sensitivity_analysis=sensitivity_analysis)
    if not results:
        logger.warning("no module with a weight_fake_quant matched; no weight plots were made")
        return []
    kind = "weight_sa" if sensitivity_analysis else "weight"
    positions = _position(sum_pos_1, "sum_pos_1"), _position(sum_pos_2, "sum_pos_2")
    options = _render_options(log_scale, figsize, dpi)
    jobs = []
    for name, result in results.items():
        shown = _display_name(name, module_name_mapping)
        view = HistogramView.of(result) if sensitivity_analysis else HistogramView.of(result.histogram)
        jobs.append(PlotJob(
            path=plot_path(folder, kind, name, module_name_mapping),
            view=view,
            title=_title("Sensitivity analysis" if sensitivity_analysis else "Weight",
                         plot_title, shown),
            tensor_kind="Weight", sensitivity=sensitivity_analysis, sum_pos_1=positions[0],
            sum_pos_2=positions[1], **options,
        ))
    return render_many(_unique_paths(jobs), workers=workers)
