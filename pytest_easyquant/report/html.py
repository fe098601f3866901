"""``<results-dir>/report.html``: a self-contained dashboard of the session's model runs.

Per model run: its configuration and versions, pass/fail counts and the headline metrics
(baseline | now | delta), per-layer charts baseline vs now, then the failing checks, each once
with its full metric table (arrays as count / share / max / mean error) and, for plots, the
baseline, obtained and difference images side by side; the passing checks stay collapsed. A
filter box hides checks and metrics whose names do not match. CSS, SVG and PNGs are inline: the
file works alone, offline, as a CI artifact.
"""

from __future__ import annotations

import re
from html import escape
from pathlib import Path
from typing import Any

from pytest_easyquant.atomic_files import atomic_write_bytes
from pytest_easyquant.report.charts import layer_chart
from pytest_easyquant.report.images import embed_png
from pytest_easyquant.report.overview import RunOverview, build_overviews
from pytest_easyquant.report.page_assets import SCRIPT, STYLE
from pytest_easyquant.report.records import VERSION_LABELS, MetricRecord, RunInfo

IMAGE_LABELS = {"baseline": "baseline", "result": "obtained", "diff": "difference"}


def write_html_report(session: Any) -> Path:
    """Write the dashboard for ``session`` (an EQSession) and return its path."""
    path = session.options.results_dir / "report.html"
    page = render_page(
        build_overviews(session.outcomes, session.runs_info), unused=session.unused, pruned=session.pruned
    )
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _delta_cell(delta: Any) -> str:
    if not isinstance(delta, (int, float)) or isinstance(delta, bool):
        return "<td>-</td>"
    return f"<td>{'0' if delta == 0 else f'{delta:+.6g}'}</td>"


def _name(text: str) -> str:
    """A metric or check name that wraps at its dots, underscores and brackets, not mid-word."""
    return escape(text).replace(".", ".<wbr>").replace("_", "_<wbr>").replace("[", "<wbr>[")


def anchor(nodeid: str) -> str:
    return "c-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", nodeid).strip("-")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _chip(status: str, count: int | None = None) -> str:
    text = f"{count} {status}" if count is not None else status
    return f'<span class="chip {escape(status)}">{escape(text)}</span>'


def render_page(overviews: list[RunOverview], *, unused: list[str] = (), pruned: list[str] = ()) -> str:
    from pytest_easyquant import __version__

    checks = sum(len(o.outcomes) for o in overviews)
    failing = sum(len(o.failing) for o in overviews)
    runs = [o for o in overviews if o.info is not None]
    totals = f"{_count(len(runs), 'model run')}, {_count(checks, 'check')}, {failing} failing"
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>easyquant report: {escape(totals)}</title><style>{STYLE}</style></head><body>",
        '<header class="top"><h1>easyquant report</h1>',
        f'<p class="totals" id="totals">{escape(totals)}</p>',
        '<input id="filter" type="search" placeholder="filter checks and metrics, e.g. layer_sqnr or conv1" '
        'aria-label="filter checks and metrics" autocomplete="off"></header><main>',
    ]
    parts += [_run_section(index, overview) for index, overview in enumerate(overviews)]
    parts.append(_baseline_hygiene(unused, pruned))
    parts.append(f"</main><footer>pytest-easyquant {escape(__version__)}</footer><script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)


def _run_section(index: int, overview: RunOverview) -> str:
    counts = " ".join(_chip(status, n) for status, n in overview.counts.items())
    parts = [
        f'<section class="run" id="run-{index}" data-suite="{escape(overview.suite)}">',
        f"<h2>{escape(overview.suite)} {counts}</h2>",
        '<div class="overview">',
        _configuration(overview.info) if overview.info is not None else "<div></div>",
        f"<div>{_headline(overview.headline)}</div>",
        "</div>",
    ]
    if overview.common_differences:
        items = "".join(f"<li>{escape(line)}</li>" for line in overview.common_differences)
        parts.append(f'<p class="recorded-head">The baselines were recorded with:</p><ul class="recorded">{items}</ul>')
    parts += _missing_lines(overview)
    run_error = overview.run_error
    if run_error:
        parts.append(f'<p class="error-line">The model run failed: {escape(run_error)}</p>')
    if overview.series:
        figures = [
            f'<figure class="chart-box"><figcaption>{escape(s.name)} per layer</figcaption>{layer_chart(s)}</figure>'
            for s in overview.series
        ]
        parts.append(f'<h3>Per layer, baseline vs now</h3><div class="charts">{"".join(figures)}</div>')
    if overview.failing:
        parts.append(f'<h3 class="failures">Failures ({len(overview.failing)})</h3>')
        common = overview.common_differences
        parts += [_check_block(outcome, opened=True, common=common, run_error=run_error) for outcome in overview.failing]
    if overview.missing:
        parts.append(
            f'<details class="group missing"><summary>{len(overview.missing)} checks without a baseline</summary>'
            + "".join(_check_block(outcome, opened=False) for outcome in overview.missing)
            + "</details>"
        )
    if overview.passing:
        parts.append(
            f'<details class="group passing"><summary>{len(overview.passing)} passing checks</summary>'
            + "".join(_check_block(outcome, opened=False, common=overview.common_differences) for outcome in overview.passing)
            + "</details>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _configuration(info: RunInfo) -> str:
    rows = [
        ("model", info.model),
        ("weights", info.weights),
        ("recipe", info.recipe),
        ("baseline recipe", info.baseline_recipe or f"{info.recipe} (its own)"),
        ("backend", info.backend),
        ("data", info.data),
        ("settings", f"seed {info.seed}, {info.calib_batches} calibration batches of {info.batch_size}, "
                     f"{info.sa_batches} SA batches, device {info.device}, CLE {'on' if info.cle else 'off'}"),
        ("baselines", info.baseline_dir),
    ]
    rows += [(label, info.versions[name]) for name, label in VERSION_LABELS if name in info.versions]
    cells = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in rows)
    return f'<dl class="config">{cells}</dl>'


def _headline(rows: list[MetricRecord]) -> str:
    if not rows:
        return '<p class="totals">no accuracy or fidelity metrics in this run</p>'
    body = []
    for row in rows:
        css = "" if row.passed else ' class="bad"'
        body.append(
            f'<tr{css} data-metric="{escape(row.metric)}"><td class="metric">{_name(row.metric)}</td>'
            f"<td>{escape(_fmt(row.baseline))}</td><td>{escape(_fmt(row.obtained))}</td>{_delta_cell(row.delta)}"
            f"<td>{escape(row.tolerance)}</td><td>{_verdict(row)}</td></tr>"
        )
    head = '<tr><th class="metric">headline metric</th><th>baseline</th><th>now</th><th>delta</th><th>tolerance</th><th></th></tr>'
    return f'<table class="headline">{head}{"".join(body)}</table>'


def _verdict(row: MetricRecord) -> str:
    if row.baseline is None:
        return "no baseline"
    return "ok" if row.passed else "outside"


def _missing_lines(overview: RunOverview) -> list[str]:
    parts = []
    commands = sorted({o.command for o in overview.missing if o.command})
    for command in commands:
        count = sum(o.command == command for o in overview.missing)
        parts.append(
            f'<p class="missing-line">{count} checks have no baseline yet; record them with:'
            f'<code class="command">{escape(command)}</code></p>'
        )
    for hint in sorted({o.hint for o in overview.missing if o.hint}):
        parts.append(f'<p class="missing-line">{escape(hint)}</p>')
    return parts


def _what(outcome: Any, run_error: str = "") -> str:
    if run_error and outcome.message == run_error:
        return "the model run failed (above)"
    rows = outcome.rows
    failed = sum(not r.passed for r in rows)
    if outcome.status == "failed":
        return f"{failed} of {len(rows)} metrics outside tolerance"
    if outcome.status in ("error", "missing"):
        first = outcome.message.splitlines()[0] if outcome.message else outcome.status
        return first.split(" (the easyquant summary has", 1)[0]
    if outcome.status == "written":
        return f"{len(rows)} metrics recorded"
    return f"all {len(rows)} metrics within tolerance"


def _check_block(outcome: Any, *, opened: bool, common: tuple[str, ...] = (), run_error: str = "") -> str:
    """One check, once: status, what failed, what changed since its baseline (beyond ``common``,
    shown for the whole run), its images and its metric table."""
    name = outcome.nodeid.split("::", 1)[-1]
    parts = [
        f'<details class="check {escape(outcome.status)}" id="{anchor(outcome.nodeid)}" '
        f'data-check="{escape(outcome.nodeid)}"{" open" if opened else ""}>',
        f'<summary>{_chip(outcome.status)}<span class="name">{_name(name)}</span>'
        f'<span class="what">{escape(_what(outcome, run_error))}</span></summary>',
    ]
    if outcome.status == "error" and "\n" in outcome.message:
        parts.append(f'<pre class="command">{escape(outcome.message)}</pre>')
    own = [line for line in outcome.metadata_differences if line not in common]
    if own:
        items = "".join(f"<li>{escape(line)}</li>" for line in own)
        parts.append(f'<p class="recorded-head">its baseline was recorded with:</p><ul class="recorded">{items}</ul>')
    if outcome.summary_lines:  # a check's own summary lines, e.g. sensitivity's most sensitive layers
        parts.append(f'<pre class="notes">{escape(chr(10).join(outcome.summary_lines))}</pre>')
    parts.append(_images(outcome))
    failing = [r for r in outcome.rows if not r.passed]
    passing = [r for r in outcome.rows if r.passed]
    if failing:
        parts.append(_metric_table(failing))
        if passing:
            parts.append(f'<details class="more"><summary>{len(passing)} metrics within tolerance</summary>'
                         f"{_metric_table(passing)}</details>")
    elif passing:
        parts.append(_metric_table(passing))
    parts.append("</details>")
    return "".join(parts)


def _note(row: MetricRecord) -> str:
    """The row's note without what the array columns already say or the image paths."""
    lines = row.note.splitlines()
    if row.array is not None and lines:
        lines = lines[1:]
    return "\n".join(line for line in lines if not line.startswith(("baseline:", "result:", "diff:")))


def _metric_table(rows: list[MetricRecord]) -> str:
    arrays = any(r.array is not None for r in rows)
    notes = any(_note(r) for r in rows)
    head = ['<th class="metric">metric</th><th>baseline</th><th>now</th><th>delta</th><th>tolerance</th>']
    if arrays:
        head.append("<th>differing</th><th>share</th><th>max abs error</th><th>mean abs error</th>")
    if notes:
        head.append('<th class="metric">note</th>')
    body = []
    for row in rows:
        css = "" if row.passed else ' class="bad"'
        source = f" ({row.source})" if row.source else ""
        cells = [
            f'<td class="metric">{_name(row.metric)}</td><td>{escape(_fmt(row.baseline))}</td>'
            f"<td>{escape(_fmt(row.obtained))}</td>{_delta_cell(row.delta)}<td>{escape(row.tolerance + source)}</td>"
        ]
        if arrays:
            a = row.array
            cells.append(
                f"<td>{a.differing} of {a.size}</td><td>{100 * a.share:.2f}%</td><td>{_fmt(a.max_abs)}</td><td>{_fmt(a.mean_abs)}</td>"
                if a is not None else "<td></td><td></td><td></td><td></td>"
            )
        if notes:
            cells.append(f'<td class="note">{escape(_note(row))}</td>')
        body.append(f'<tr{css} data-metric="{escape(row.metric)}">{"".join(cells)}</tr>')
    return f'<table class="metrics"><tr>{"".join(head)}</tr>{"".join(body)}</table>'


def _images(outcome: Any) -> str:
    """Baseline | obtained | difference for a failed image check, inline."""
    pictures = []
    for artifact in outcome.artifacts:
        path = Path(artifact)
        if path.suffix.lower() != ".png":
            continue
        image = embed_png(path)
        if image is None:
            continue
        label = IMAGE_LABELS.get(path.stem, path.stem)
        size = f' width="{image.width}" height="{image.height}"' if image.width else ""
        pictures.append(
            f'<figure><figcaption>{escape(label)}</figcaption><img src="{image.uri}"{size} '
            f'alt="{escape(label)} image of {escape(outcome.check)}" data-role="{escape(path.stem)}"></figure>'
        )
    return f'<div class="triptych">{"".join(pictures)}</div>' if pictures else ""


def _baseline_hygiene(unused: list[str], pruned: list[str]) -> str:
    parts = []
    if pruned:
        items = "".join(f"<li>{escape(p)}</li>" for p in pruned)
        parts.append(f'<section class="run"><h2>Deleted unused baselines ({len(pruned)})</h2><ul>{items}</ul></section>')
    if unused:
        items = "".join(f"<li>{escape(p)}</li>" for p in unused)
        parts.append(
            f'<section class="run"><h2>Unused baselines ({len(unused)})</h2>'
            f"<p>No check of this session uses them; <code>--eq-prune-unused</code> deletes them.</p><ul>{items}</ul></section>"
        )
    return "\n".join(parts)
