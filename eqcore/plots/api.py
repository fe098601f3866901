"""QTH and sensitivity-analysis plots with the seeds' API, plus pure renderers for baselines.

Two layers:

- ``plot_quant_act_hist``, ``plot_quant_act_SA_hist``, ``plot_quant_weight_hist`` and
  ``per_channel_boxplots`` keep the seeds' names and arguments and write the seeds' files::

      <file_path>/activations/hists/Act-hist-<name>.png
      <file_path>/activations/sensitivity_analysis/SA-Act-hist-<name>.png
      <file_path>/weights/hists/Weight-hist-<name>.png
      <file_path>/weights/sensitivity_analysis/Weight-hist-<name>.png

  where ``<name>`` is ``module_name_mapping(module name)`` (activation quantizer names such as
  ``activation_post_process_1``; for weights the module's name, e.g. ``layer4.0.conv2``), made
  safe as a file name: path separators and characters Windows rejects become ``-``, so nothing
  is written outside ``file_path``.
- ``render_act_hist``, ``render_weight_hist`` and ``render_sa_hist`` turn one histogram (a
  :class:`TensorHistogram`, a hooks result, or a :class:`HistogramView` rebuilt from stored
  arrays) into a ``Figure``; ``save_figure`` writes it as a byte-stable PNG; ``render_many``
  renders a list of :class:`PlotJob` in worker processes.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, and no change
to the user's backend or rcParams (the fixed style is a context around each render).
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from eqcore.plots.render import (
    DEFAULT_DPI,
    DEFAULT_FIGSIZE,
    DEFAULT_SA_FIGSIZE,
    PLOT_STYLE,
    HistogramView,
    close_figure,
    figure_to_png,
    plot_style,
    render_hist,
    render_sa_hist,
    save_figure,
)
from eqcore.errors import EQError
from eqcore.analysis.histogram import GradientHistogram, TensorHistogram

__all__ = [
    "DEFAULT_DPI",
    "DEFAULT_FIGSIZE",
    "DEFAULT_SA_FIGSIZE",
    "PLOT_STYLE",
    "HistogramView",
    "PlotJob",
    "close_figure",
    "figure_to_png",
    "per_channel_boxplots",
    "plot_file_name",
    "plot_path",
    "plot_quant_act_SA_hist",
    "plot_quant_act_hist",
    "plot_quant_weight_hist",
    "plot_style",
    "render_act_hist",
    "render_job",
    "render_many",
    "render_sa_hist",
    "render_weight_hist",
    "save_figure",
]

logger = logging.getLogger(__name__)

NameMapping = Callable[[str], str]
ConditionsMet = Callable[[torch.nn.Module, str], bool]

PLOT_KINDS: dict[str, tuple[str, str, str]] = {
    "act": ("activations", "hists", "Act-hist-"),
    "act_sa": ("activations", "sensitivity_analysis", "SA-Act-hist-"),
    "weight": ("weights", "hists", "Weight-hist-"),
    "weight_sa": ("weights", "sensitivity_analysis", "Weight-hist-"),
}
"""Plot kind -> (folder, subfolder, file-name prefix), as the seeds lay them out."""

_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
_MAX_NAME_BYTES = 200


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


def plot_file_name(kind: str, module_name: str, module_name_mapping: NameMapping | None = None) -> str:
    """The seeds' file name of a plot, e.g. ``Weight-hist-layer4-0-conv2.png``.

    ``module_name_mapping`` is applied first; then path separators, control characters and
    characters Windows rejects become ``-``, and over-long names are shortened with a hash, so
    the result is always one plain file name.
    """
    if kind not in PLOT_KINDS:
        raise ValueError(f"unknown plot kind {kind!r}; expected one of {sorted(PLOT_KINDS)}")
    name = module_name_mapping(module_name) if module_name_mapping else module_name
    if not isinstance(name, str):
        raise EQError(
            f"module_name_mapping returned {type(name).__name__} for {module_name!r}; it must "
            "return a string"
        )
    safe = _UNSAFE.sub("-", name).strip() or "unnamed"
    stem = PLOT_KINDS[kind][2] + safe
    if len(stem.encode()) > _MAX_NAME_BYTES:
        digest = hashlib.sha1(stem.encode()).hexdigest()[:10]
        stem = stem.encode()[: _MAX_NAME_BYTES - 11].decode(errors="ignore") + "-" + digest
    return stem + ".png"


def plot_path(file_path: str | os.PathLike[str], kind: str, module_name: str,
              module_name_mapping: NameMapping | None = None) -> Path:
    """Where a plot of ``kind`` for ``module_name`` goes under ``file_path``."""
    name = plot_file_name(kind, module_name, module_name_mapping)
    folder, subfolder, _ = PLOT_KINDS[kind]
    return Path(file_path) / folder / subfolder / name


@dataclass(frozen=True)
class PlotJob:
    """One plot to draw and write: picklable data only, so it can go to a worker process.

    ``sensitivity`` draws the SA layout (``view`` must then carry ``binned_grads`` or the
    gradient panel says none were recorded).
    """

    path: Path
    view: HistogramView
    title: str = ""
    tensor_kind: str = "Activation"
    sensitivity: bool = False
    sum_pos_1: tuple[float, ...] | None = None
    sum_pos_2: tuple[float, ...] | None = None
    log_scale: bool = False
    figsize: tuple[float, float] | None = None
    dpi: float = DEFAULT_DPI

    def render(self) -> Figure:
        if self.sensitivity:
            return render_sa_hist(
                self.view, title=self.title, tensor_kind=self.tensor_kind,
                sum_pos_1=self.sum_pos_1, sum_pos_2=self.sum_pos_2, log_scale=self.log_scale,
                figsize=self.figsize or DEFAULT_SA_FIGSIZE, dpi=self.dpi,
            )
        return render_hist(
            self.view, title=self.title, tensor_kind=self.tensor_kind, sum_pos=self.sum_pos_1,
            log_scale=self.log_scale, figsize=self.figsize or DEFAULT_FIGSIZE, dpi=self.dpi,
        )


def render_job(job: PlotJob) -> Path:
    """Draw ``job`` and write its PNG; the unit of work of :func:`render_many`."""
    return save_figure(job.render(), job.path)


def _default_start_method() -> str:
    """The start method for workers: fork on Linux (they start at once), else spawn."""
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return "spawn"


def render_many(jobs: Iterable[PlotJob], *, workers: int | None = None,
                mp_context: str | None = None) -> list[Path]:
    """Render ``jobs`` and return their paths in order; ``workers`` > 1 uses worker processes.

    Workers receive the jobs' arrays, never figures, and touch only numpy, matplotlib and
    Pillow, so forking a process that has used torch is safe (as torch's own DataLoader does);
    the default start method is "fork" on Linux and "spawn" elsewhere, where each worker first
    imports eqcore (seconds), so parallel rendering pays off there only for hundreds of plots.
    The PNGs are the same bytes as rendering in-process.
    """
    jobs = list(jobs)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise EQError(f"workers must be a positive integer or None, got {workers!r}")
    workers = min(workers or 1, len(jobs))
    if workers <= 1:
        return [render_job(job) for job in jobs]
    method = mp_context or _default_start_method()
    chunksize = max(1, math.ceil(len(jobs) / (workers * 4)))
    with warnings.catch_warnings():
        # Python >= 3.12 warns on fork() in a threaded process (torch's pools); the workers
        # only run numpy, matplotlib and Pillow code, which holds none of those threads' locks.
        warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks.*",
                                category=DeprecationWarning)
        with ProcessPoolExecutor(max_workers=workers,
                                 mp_context=multiprocessing.get_context(method)) as pool:
            return list(pool.map(render_job, jobs, chunksize=chunksize))


def _unique_paths(jobs: list[PlotJob]) -> list[PlotJob]:
    """Give jobs whose names collide (e.g. a lossy ``module_name_mapping``) distinct files."""
    seen: dict[Path, int] = {}
    unique = []
    for job in jobs:
        path = job.path
        count = seen.get(path, 0)
        seen[path] = count + 1
        if count:
            new = path.with_name(f"{path.stem}-{count + 1}{path.suffix}")
            logger.warning("plot file name %s is already used; writing %s instead", path.name,
                           new.name)
            job = PlotJob(**{**job.__dict__, "path": new})
        unique.append(job)
    return unique


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


def _check_folder(file_path: Any) -> Path:
    if not isinstance(file_path, (str, os.PathLike)):
        raise EQError(f"file_path must be a folder path (str or Path), got {type(file_path).__name__}")
    return Path(file_path)


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

    Weights are binned by :func:`eqcore.analysis.hooks.weight_histograms` on their quantizer's grid
    (``bit_res`` sets its resolution). Writes ``file_path/weights/hists/Weight-hist-<name>.png``,
    or with ``sensitivity_analysis`` (the weights' ``.grad`` from a backward you ran, binned on
    the same grid) ``file_path/weights/sensitivity_analysis/Weight-hist-<name>.png``; ``<name>``
    is the module's name through ``module_name_mapping``. Returns the paths.
    """
    from eqcore.analysis.hooks import weight_histograms

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
