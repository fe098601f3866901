"""The bare-figure frame a panel is drawn in: transforms, clipping, ticks and y scale.

Panels are drawn straight on the figure instead of on ``Axes`` (see :class:`_Frame`), which
would cost more than everything else in a plot. The helpers here build one path per family of
lines (:func:`_segments`), exact tick labels and the linear or log y scale of shares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, MaxNLocator
from matplotlib.transforms import (
    Bbox,
    BboxTransformFrom,
    BboxTransformTo,
    TransformedBbox,
    blended_transform_factory,
)

from eqcore.plots.style import MINUS, TICK_FONT, TICK_INCHES
from eqcore.plots.texts import _layer

def _segments(xs: Sequence[float] | np.ndarray, y0: float, y1: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertical segments at ``xs`` as one NaN-separated polyline (one path, not one per line)."""
    xs = np.asarray(xs, dtype=np.float64)
    x = np.repeat(xs, 3)
    x[2::3] = np.nan
    y = np.tile([y0, y1, np.nan], xs.size)
    return x, y


def _decimal_labels(values: np.ndarray, *, suffix: str = "") -> list[str]:
    """Shortest common fixed-point labels that represent every tick exactly."""
    if values.size == 0:
        return []
    step = float(np.min(np.diff(values))) if values.size > 1 else max(abs(float(values[0])), 1.0)
    decimals = 0
    while decimals < 10 and np.any(np.abs(np.round(values, decimals) - values) > 1e-6 * step):
        decimals += 1
    labels = []
    for value in values:
        text = f"{value:.{decimals}f}"
        if float(text) == 0:
            text = f"{0:.{decimals}f}"
        labels.append(text.replace("-", MINUS) + suffix)
    return labels


def _inside(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    tolerance = 1e-9 * max(abs(hi - lo), 1e-300)
    return values[(values >= lo - tolerance) & (values <= hi + tolerance)]


class _Frame:
    """A plotting area drawn straight on the figure: data transforms, clipping, ticks.

    Stands in for an ``Axes``: building one Axes (with its axis, tick and text artists) and
    drawing it costs more than everything else in these plots, and the plots need only a data
    transform, a clip box and a few ticks. ``y`` is in log10 units when ``log`` is set.
    """

    def __init__(self, fig: Figure, rect: Sequence[float], xlim: tuple[float, float],
                 ylim: tuple[float, float]) -> None:
        self.fig = fig
        self.rect = tuple(float(v) for v in rect)
        box = TransformedBbox(Bbox.from_bounds(*self.rect), fig.transFigure)
        self.clip = box
        self.area = BboxTransformTo(box)
        self.data = BboxTransformFrom(Bbox([[xlim[0], ylim[0]], [xlim[1], ylim[1]]])) + self.area
        self.xspan = blended_transform_factory(self.data, self.area)
        self.xlim, self.ylim = xlim, ylim
        width, height = fig.get_size_inches()
        self.inch_x = 1.0 / (self.rect[2] * width)
        self.inch_y = 1.0 / (self.rect[3] * height)

    def add(self, artist, *, transform=None, clip: bool = True, zorder: float = 1.0):
        artist.set_transform(transform if transform is not None else self.data)
        artist.set_zorder(zorder)
        if clip:
            artist.set_clip_box(self.clip)
        else:
            artist.set_clip_on(False)
        self.fig.add_artist(artist)
        return artist

    def text(self, x: float, y: float, s: str, *, transform=None, **kwargs):
        return self.fig.text(x, y, s, transform=transform or self.area, **kwargs)

    def fixed_text(self, x: float, y: float, s: str, *, transform=None, **kwargs):
        """A text that does not depend on the data (drawn through the cached layer)."""
        return _layer(self.fig).text(x, y, s, transform=transform or self.area, **kwargs)

    def spines(self) -> None:
        self.add(Line2D([0, 0, 1], [1, 0, 0], color="black", lw=0.8, solid_joinstyle="miter"),
                 transform=self.area, clip=False, zorder=2.5)

    def ticks(self, x_ticks: np.ndarray | None, y_ticks: np.ndarray, y_labels: list[str]) -> None:
        length_y, length_x = TICK_INCHES * self.inch_y, TICK_INCHES * self.inch_x
        if x_ticks is not None and x_ticks.size:
            self.add(Line2D(*_segments(x_ticks, 0, -length_y), color="black", lw=0.8),
                     transform=self.xspan, clip=False, zorder=2.5)
            for x, label in zip(x_ticks, _decimal_labels(x_ticks)):
                self.text(x, -1.7 * length_y, label, transform=self.xspan, ha="center",
                          va="top", fontsize=TICK_FONT)
        y_axes = (np.asarray(y_ticks, dtype=np.float64) - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        x, y = _segments(y_axes, 0, -length_x)
        self.add(Line2D(y, x, color="black", lw=0.8), transform=self.area, clip=False, zorder=2.5)
        for y_value, label in zip(y_axes, y_labels):
            self.text(-1.7 * length_x, y_value, label, ha="right", va="center",
                      fontsize=TICK_FONT)


def _y_scale(share: np.ndarray, *, log_scale: bool, top_share: float):
    """Plot-space y of shares, the y limits, and the y ticks with their labels."""
    if log_scale:
        positive = share[share > 0]
        low = float(positive.min()) * 0.5 if positive.size else 1e-6
        high = float(share.max()) * 3 if positive.size else 1.0
        ticks = _inside(LogLocator(numticks=6).tick_values(low, high), low, high)
        labels = [f"{100 * t:g}%".replace("-", MINUS) for t in ticks]
        with np.errstate(divide="ignore"):
            to_plot = lambda v: np.log10(np.maximum(np.asarray(v, dtype=np.float64), low))
        return to_plot, (math.log10(low), math.log10(high)), to_plot(ticks), labels
    high = top_share * 1.12 or 1.0
    ticks = _inside(MaxNLocator(4).tick_values(0.0, high), 0.0, high)
    return (lambda v: np.asarray(v, dtype=np.float64)), (0.0, high), ticks, \
        _decimal_labels(100 * ticks, suffix="%")
