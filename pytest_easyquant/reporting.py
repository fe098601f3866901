"""The terminal summary of the generated suites: per model, headline and failing metrics, the
command that records missing baselines, unused and deleted baselines.

It reads the session's :class:`~pytest_easyquant.session.Outcome` records (on the xdist
controller, the ones the workers sent), so it looks the same with and without xdist; the HTML
dashboard and the JSON summary are in :mod:`pytest_easyquant.report`.
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from typing import Any

import pytest

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
    # Metric names stay whole (a cut name cannot be searched for); values are cut at 40 characters.
    cells = [list(COLUMNS)] + [[str(row[0]), *(_fmt(v) for v in row[1:5])] for row in rows]
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
        for line in (line for o in outcomes for line in o.summary_lines):
            reporter.write_line("  " + line)
        missing = [o for o in outcomes if o.status == "missing"]
        for command in sorted({o.command for o in missing}):
            count = sum(o.command == command for o in missing)
            checks = "1 check has" if count == 1 else f"{count} checks have"
            reporter.write_line(f"  {checks} no baseline yet; record {'it' if count == 1 else 'them'} with: {command}")
        for hint in sorted({o.hint for o in missing if o.hint}):
            reporter.write_line(f"  {hint}")
        errors = defaultdict(int)
        for outcome in outcomes:
            if outcome.status == "error" and outcome.message:
                errors[outcome.message] += 1
        # A failed model run fails every check with the same line: print it once. Unusable
        # baselines differ per check, and each failure above already says how to re-record it.
        shown = sorted(m for m, n in errors.items() if n > 1 or len(errors) == 1)
        for message in shown:
            reporter.write_line(f"  error: {message}")
        if len(errors) > len(shown):
            reporter.write_line(f"  {len(errors) - len(shown)} more checks errored; each failure above says how to repair it")
    if session.pruned:
        reporter.write_line(f"deleted {len(session.pruned)} unused baselines (--eq-prune-unused):")
        for path in session.pruned:
            reporter.write_line(f"  {path}")
    if session.unused:
        reporter.write_line(f"unused baselines ({len(session.unused)}), not checked by any generated test:")
        for path in session.unused:
            reporter.write_line(f"  {path}")
        failing = "they fail this session (--eq-fail-unused); " if session.options.fail_unused else ""
        reporter.write_line(f"  {failing}delete them with: {_prune_command(session)}")
    if session.report_path is not None:
        reporter.write_line(f"easyquant report: {session.report_path}")
    if session.json_path is not None:
        reporter.write_line(f"easyquant JSON summary: {session.json_path}")


def _prune_command(session: EQSession) -> str:
    """The invocation as it was, plus ``--eq-prune-unused`` (without failing on what it deletes)."""
    args = [a for a in session.config.invocation_params.args if a != "--eq-prune-unused"]
    return shlex.join(["pytest", *args, "--eq-prune-unused"])
