"""Cached text blitting: the texts every plot repeats, rasterized once and drawn as images.

Matplotlib's Agg text path is most of a small plot's time, and the key, axis labels and level
labels do not depend on the data, so :class:`_CachedTexts` keeps their bitmaps; :func:`_layer`
gives a figure its one cached-text layer.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import matplotlib
import numpy as np
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.text import Text

class _CachedTexts(Artist):
    """Texts that every plot of a kind repeats (key, labels), blitted from a bitmap cache.

    Matplotlib's Agg text path costs about 0.1 ms per glyph, most of a small plot's time. These
    texts do not depend on the data, so under Agg they are rasterized once per (texts, canvas
    size, dpi) onto a transparent canvas, cut into one tile per text, and later drawn as images;
    any other renderer (PDF, SVG) draws the texts themselves. Same texts, same pixels.
    """

    _tiles: OrderedDict[tuple, list[tuple[int, int, np.ndarray]]] = OrderedDict()
    _limit = 64
    _lock = threading.Lock()

    def __init__(self, fig: Figure) -> None:
        super().__init__()
        self.set_figure(fig)
        self.texts: list[Text] = []
        self.set_zorder(3)

    def text(self, x: float, y: float, s: str, *, transform=None, **kwargs) -> Text:
        text = Text(x, y, s, **kwargs)
        text.set_figure(self.figure)
        text.set_transform(transform if transform is not None else self.figure.transFigure)
        self.texts.append(text)
        return text

    def get_children(self) -> list[Text]:
        return list(self.texts)

    def _key(self, renderer: RendererAgg) -> tuple:
        entries = []
        for text in self.texts:
            x, y = text.get_transform().transform(text.get_unitless_position())
            entries.append((
                text.get_text(), float(x), float(y), text.get_fontsize(),
                text.get_horizontalalignment(), text.get_verticalalignment(),
                text.get_rotation(), to_hex(text.get_color(), keep_alpha=True),
                str(text.get_fontweight()), tuple(text.get_fontfamily()),
                text.get_linespacing(), text.get_visible(), text.get_antialiased(),
            ))
        return (int(renderer.width), int(renderer.height), float(renderer.dpi),
                matplotlib.rcParams["text.hinting"], tuple(entries))

    def _rasterize(self, renderer: RendererAgg) -> list[tuple[int, int, np.ndarray]]:
        width, height = int(renderer.width), int(renderer.height)
        canvas = RendererAgg(width, height, renderer.dpi)
        boxes = []
        for text in self.texts:
            if text.get_visible() and text.get_text():
                text.draw(canvas)
                boxes.append(text.get_window_extent(canvas))
        pixels = np.asarray(canvas.buffer_rgba())
        regions = []
        for box in boxes:
            region = [max(int(box.x0) - 2, 0), max(int(box.y0) - 2, 0),
                      min(int(math.ceil(box.x1)) + 2, width), min(int(math.ceil(box.y1)) + 2, height)]
            # Overlapping tiles would blend their shared pixels twice: merge them.
            while (other := next((r for r in regions if _overlap(r, region)), None)) is not None:
                regions.remove(other)
                region = [min(region[0], other[0]), min(region[1], other[1]),
                          max(region[2], other[2]), max(region[3], other[3])]
            regions.append(region)
        tiles = []  # draw_image takes rows bottom-up
        for x0, y0, x1, y1 in regions:
            if x1 > x0 and y1 > y0:
                tiles.append((x0, y0, pixels[height - y1 : height - y0, x0:x1][::-1].copy()))
        return tiles

    def draw(self, renderer) -> None:
        if not self.get_visible():
            return
        if not isinstance(renderer, RendererAgg):
            for text in self.texts:
                text.draw(renderer)
            return
        key = self._key(renderer)
        with self._lock:
            tiles = self._tiles.get(key)
            if tiles is not None:
                self._tiles.move_to_end(key)
        if tiles is None:
            tiles = self._rasterize(renderer)
            with self._lock:
                self._tiles[key] = tiles
                while len(self._tiles) > self._limit:
                    self._tiles.popitem(last=False)
        gc = renderer.new_gc()
        for x, y, tile in tiles:
            renderer.draw_image(gc, x, y, tile)
        gc.restore()
        self.stale = False


def _overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _layer(fig: Figure) -> _CachedTexts:
    """The figure's cached-text layer (created on first use)."""
    for artist in fig.artists:
        if isinstance(artist, _CachedTexts):
            return artist
    layer = _CachedTexts(fig)
    fig.add_artist(layer)
    return layer
