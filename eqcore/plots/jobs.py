"""Plot files and batch rendering: the seeds' file names, :class:`PlotJob` and :func:`render_many`.

Plots go where the seeds put them::

    <file_path>/activations/hists/Act-hist-<name>.png
    <file_path>/activations/sensitivity_analysis/SA-Act-hist-<name>.png
    <file_path>/weights/hists/Weight-hist-<name>.png
    <file_path>/weights/sensitivity_analysis/Weight-hist-<name>.png

where ``<name>`` is ``module_name_mapping(module name)`` (activation quantizer names such as
``activation_post_process_1``; for weights the module's name, e.g. ``layer4.0.conv2``), made
safe as a file name: path separators and characters Windows rejects become ``-``, so nothing
is written outside ``file_path``. ``render_many`` renders a list of :class:`PlotJob` in worker
processes.
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
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from eqcore.errors import EQError
from eqcore.plots.png import save_figure
from eqcore.plots.render import render_hist, render_sa_hist
from eqcore.plots.style import DEFAULT_DPI, DEFAULT_FIGSIZE, DEFAULT_SA_FIGSIZE
from eqcore.plots.view import HistogramView

__all__ = [
    "PlotJob",
    "plot_file_name",
    "plot_path",
    "render_job",
    "render_many",
]

logger = logging.getLogger(__name__)

NameMapping = Callable[[str], str]

PLOT_KINDS: dict[str, tuple[str, str, str]] = {
    "act": ("activations", "hists", "Act-hist-"),
    "act_sa": ("activations", "sensitivity_analysis", "SA-Act-hist-"),
    "weight": ("weights", "hists", "Weight-hist-"),
    "weight_sa": ("weights", "sensitivity_analysis", "Weight-hist-"),
}
"""Plot kind -> (folder, subfolder, file-name prefix), as the seeds lay them out."""

_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
_MAX_NAME_BYTES = 200


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


def _check_folder(file_path: Any) -> Path:
    if not isinstance(file_path, (str, os.PathLike)):
        raise EQError(f"file_path must be a folder path (str or Path), got {type(file_path).__name__}")
    return Path(file_path)
