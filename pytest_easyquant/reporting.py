"""Reports of the generated suites: a terminal summary per model and an HTML page.

Both read the session's :class:`~pytest_easyquant.session.Outcome` records (on the xdist
controller, the ones the workers sent), so they look the same with and without xdist.
"""

from __future__ import annotations

import html
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from pytest_easyquant.atomic_files import atomic_write_bytes
from pytest_easyquant.session import EQSession, Outcome

HEADLINE_KINDS = ("accuracy", "fidelity")
MAX_FAILED_ROWS = 25
COLUMNS = ("metric", "baseline", "now", "delta", "tolerance")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:.6g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _table(rows: list[list[Any]]) -> list[str]:
    cells = [list(COLUMNS)] + [[_fmt(v) for v in row[:5]] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _by_suite(outcomes: list[Outcome]) -> dict[str, list[Outcome]]:
    grouped: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in sorted(outcomes, key=lambda o: o.nodeid):
        grouped[outcome.suite].append(outcome)
    return dict(sorted(grouped.items()))


def terminal_summary(reporter: pytest.TerminalReporter, session: EQSession) -> None:
    """metric | baseline | now | delta | tolerance per model: headline metrics and every failure."""
    reporter.write_sep("=", "easyquant summary")
    for suite, outcomes in _by_suite(session.outcomes).items():
        counts = defaultdict(int)
        for outcome in outcomes:
            counts[outcome.status] += 1
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        reporter.write_line(f"{suite}: {summary}")
        for note in dict.fromkeys(note for outcome in outcomes for note in outcome.notes):
            reporter.write_line(f"  note: {note}")
        headline = [r for o in outcomes if o.check in HEADLINE_KINDS for r in o.rows]
        failed = [r for o in outcomes if o.check not in HEADLINE_KINDS for r in o.rows if not r[5]]
        for line in _table(headline + failed[:MAX_FAILED_ROWS]) if headline or failed else []:
            reporter.write_line("  " + line)
        if len(failed) > MAX_FAILED_ROWS:
            reporter.write_line(f"  ... and {len(failed) - MAX_FAILED_ROWS} more failing metrics (see the HTML report)")
        missing = [o for o in outcomes if o.status == "missing"]
        if missing:
            reporter.write_line(f"  {len(missing)} checks have no baseline yet; record them with: {missing[0].command}")
            if missing[0].hint:
                reporter.write_line(f"  {missing[0].hint}")
        errors = {o.message for o in outcomes if o.status == "error" and o.message}
        for message in sorted(errors):
            reporter.write_line(f"  error: {message}")
    if session.unused:
        reporter.write_line(f"unused baselines ({len(session.unused)}), not checked by any generated test:")
        for path in session.unused:
            reporter.write_line(f"  {path}")
    if session.report_path is not None:
        reporter.write_line(f"easyquant report: {session.report_path}")


def _html_table(rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = []
    for row in rows:
        cls = "" if row[5] else ' class="bad"'
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row[:5]) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _images(outcome: Outcome, report_dir: Path) -> str:
    pictures = []
    for artifact in outcome.artifacts:
        path = Path(artifact)
        if path.suffix.lower() != ".png":
            continue
        rel = os.path.relpath(path, report_dir)
        pictures.append(f'<figure><img src="{html.escape(rel)}"><figcaption>{html.escape(path.stem)}</figcaption></figure>')
    return f'<div class="images">{"".join(pictures)}</div>' if pictures else ""


def write_html_report(session: EQSession) -> Path:
    """``<results-dir>/report.html``: failures first with their images, then every table."""
    report_dir = session.options.results_dir
    path = report_dir / "report.html"
    outcomes = sorted(session.outcomes, key=lambda o: (o.status not in ("failed", "error", "missing"), o.nodeid))
    failing = [o for o in outcomes if o.status in ("failed", "error", "missing")]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>easyquant report</title><style>",
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:.5em 0}",
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}",
        "td:first-child{text-align:left}tr.bad{background:#fdd}pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}",
        ".images{display:flex;gap:8px}.images img{max-width:32vw;border:1px solid #ccc}",
        "</style></head><body><h1>easyquant report</h1>",
        f"<p>{len(outcomes)} checks, {len(failing)} failing.</p>",
    ]
    if failing:
        parts.append("<h2>Failures</h2>")
        for outcome in failing:
            parts.append(f"<h3>{html.escape(outcome.nodeid)}</h3><pre>{html.escape(outcome.message)}</pre>")
            parts.append(_images(outcome, report_dir))
            parts.append(_html_table([r for r in outcome.rows if not r[5]]))
    for suite, suite_outcomes in _by_suite(session.outcomes).items():
        parts.append(f"<h2>{html.escape(suite)}</h2>")
        for note in dict.fromkeys(note for outcome in suite_outcomes for note in outcome.notes):
            parts.append(f"<p>note: {html.escape(note)}</p>")
        for outcome in suite_outcomes:
            if outcome.rows:
                parts.append(f"<h4>{html.escape(outcome.check)} ({outcome.status})</h4>{_html_table(outcome.rows)}")
    parts.append("</body></html>")
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path
