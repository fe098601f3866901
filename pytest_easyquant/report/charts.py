"""Per-layer charts as inline SVG: baseline vs now along the network, drawn without matplotlib so
the report stays one small self-contained file.

Layers run left to right in network order; the baseline is a grey line with open circles, this
run a blue line with filled ones, points outside tolerance are red. Every point has a tooltip
(layer, baseline, now, delta). Non-finite values are listed under the chart instead of drawn.
"""

from __future__ import annotations

import math
from html import escape

from pytest_easyquant.report.overview import LayerSeries

PLOT_HEIGHT = 200
LEFT, RIGHT, TOP = 64, 16, 28
STEP = 30
MIN_WIDTH = 520
CHAR_WIDTH = 6.2  # of the 11px label font, for the rotated labels' room
BASELINE_COLOR, NOW_COLOR, FAIL_COLOR = "#8a8f98", "#1f6feb", "#d1242f"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _polyline(points: list[tuple[float, float]], color: str, dashed: bool) -> str:
    if len(points) < 2:
        return ""
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    return f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>'


def layer_chart(series: LayerSeries) -> str:
    """One series as an ``<svg>`` element (with a ``<title>`` naming it)."""
    points = series.points
    values = [v for p in points for v in (p.baseline, p.now) if _finite(v)]
    skipped = [p.layer for p in points if any(v is not None and not math.isfinite(v) for v in (p.baseline, p.now))]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    ticks = _nice_ticks(low, high)
    low, high = ticks[0], ticks[-1]
    label_room = int(min(170, max(len(p.layer) for p in points) * CHAR_WIDTH * 0.72 + 14))
    width = max(MIN_WIDTH, LEFT + RIGHT + STEP * len(points))
    height = TOP + PLOT_HEIGHT + label_room
    step = (width - LEFT - RIGHT) / len(points)

    def x_of(index: int) -> float:
        return LEFT + step * (index + 0.5)

    def y_of(value: float) -> float:
        return TOP + PLOT_HEIGHT * (1 - (value - low) / (high - low))

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(series.name)} per layer">',
        f"<title>{escape(series.name)} per layer: baseline vs now</title>",
    ]
    for tick in ticks:
        y = y_of(tick)
        parts.append(f'<line x1="{LEFT}" x2="{width - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{tick:g}</text>')
    baseline_line = [(x_of(i), y_of(p.baseline)) for i, p in enumerate(points) if _finite(p.baseline)]
    now_line = [(x_of(i), y_of(p.now)) for i, p in enumerate(points) if _finite(p.now)]
    parts.append(_polyline(baseline_line, BASELINE_COLOR, dashed=True))
    parts.append(_polyline(now_line, NOW_COLOR, dashed=False))
    for index, point in enumerate(points):
        x = x_of(index)
        delta = point.now - point.baseline if _finite(point.now) and _finite(point.baseline) else None
        tip = escape(f"{point.layer}: baseline {_fmt(point.baseline)}, now {_fmt(point.now)}, delta {_fmt(delta)}")
        if _finite(point.baseline):
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y_of(point.baseline):.1f}" r="3.5" fill="#fff" '
                f'stroke="{BASELINE_COLOR}" stroke-width="1.5"><title>{tip}</title></circle>'
            )
        if _finite(point.now):
            color = NOW_COLOR if point.passed else FAIL_COLOR
            radius = 3.5 if point.passed else 4.5
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y_of(point.now):.1f}" r="{radius}" fill="{color}">'
                f"<title>{tip}</title></circle>"
            )
        label_y = TOP + PLOT_HEIGHT + 10
        parts.append(
            f'<text x="{x:.1f}" y="{label_y}" transform="rotate(-45 {x:.1f} {label_y})" '
            f'text-anchor="end" class="label">{escape(point.layer)}</text>'
        )
    legend_x = width - RIGHT - 190
    parts.append(
        f'<g class="legend"><line x1="{legend_x}" x2="{legend_x + 18}" y1="12" y2="12" stroke="{BASELINE_COLOR}" '
        f'stroke-dasharray="4 3" stroke-width="1.5"/><text x="{legend_x + 22}" y="16">baseline</text>'
        f'<line x1="{legend_x + 80}" x2="{legend_x + 98}" y1="12" y2="12" stroke="{NOW_COLOR}" stroke-width="1.5"/>'
        f'<text x="{legend_x + 102}" y="16">now</text><circle cx="{legend_x + 140}" cy="12" r="4" fill="{FAIL_COLOR}"/>'
        f'<text x="{legend_x + 147}" y="16">failed</text></g>'
    )
    parts.append("</svg>")
    note = f'<p class="chart-note">not drawn (not finite): {escape(", ".join(skipped))}</p>' if skipped else ""
    return "".join(parts) + note
