"""The generated suite: one collector per ``--eq-model``, one item per check.

Node ids are stable (``easyquant[<model>-<weights>-<recipe>]::<check>``), so ``-k``, ``-m``,
``--lf`` and pytest-xdist work on them. Every item goes through the same routine: obtain the
values, then write them (update modes) or read the baseline and compare through
``errors.run_check``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_easyquant.atomic_files import atomic_write_bytes
from pytest_easyquant.check_report import CheckReport
from pytest_easyquant.checks import Check, Payload, plan_checks
from pytest_easyquant.commands import record_missing_command, rerecord_check_command, user_test_command
from pytest_easyquant.errors import BaselineError, CheckFailure, run_check
from pytest_easyquant.naming import baseline_file, sanitize, weights_label
from pytest_easyquant.report.junit import check_properties
from pytest_easyquant.report.records import MetricRecord
from pytest_easyquant.session import EQSession, Outcome, PipelineError, get_session
from pytest_easyquant.storage import (
    BaselineMetadata,
    MissingBaseline,
    read_json,
    read_npz,
    read_png,
    write_json,
    write_npz,
    write_png,
)
from pytest_easyquant.tolerance_sources import tolerance_table

QUIET_ERRORS = (CheckFailure, BaselineError, PipelineError)


def suite_name(request: Any, root: Path) -> str:
    label = weights_label(request.weights, root=root)
    return f"easyquant[{sanitize(request.model)}-{label}-{sanitize(request.recipe)}]"


class EQSuite(pytest.Collector):
    """The checks of one model run."""

    def __init__(self, *, request: Any, checks: list[Check], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eq_request = request
        self.checks = checks

    def collect(self) -> list[EQCheckItem]:
        return [EQCheckItem.from_parent(self, name=check.name, check=check) for check in self.checks]


@dataclass
class StoredPayload:
    payload: Payload
    metadata: BaselineMetadata
    tolerance: dict[str, Any]


def _files(check: Check, directory: Path) -> dict[str, Path]:
    return {suffix: baseline_file(directory, check.storage_key, suffix) for suffix in check.suffixes}


def read_payload(check: Check, directory: Path) -> StoredPayload:
    files = _files(check, directory)
    payload = Payload()
    metadata = None
    tolerance: dict[str, Any] = {}
    if ".json" in files:
        stored = read_json(files[".json"])
        payload.values, metadata, tolerance = stored.values, stored.metadata, stored.tolerance or {}
    if ".npz" in files:
        stored_arrays = read_npz(files[".npz"])
        payload.arrays = stored_arrays.arrays
        metadata = metadata or stored_arrays.metadata
    if ".png" in files:
        payload.png = read_png(files[".png"])
        metadata = read_json(directory / "metadata.json").metadata if (directory / "metadata.json").exists() else None
    return StoredPayload(payload, metadata, tolerance)


def write_payload(check: Check, directory: Path, payload: Payload, metadata: BaselineMetadata, tolerance: dict[str, Any]) -> list[Path]:
    files = _files(check, directory)
    if ".json" in files:
        write_json(files[".json"], values=payload.values or {}, metadata=metadata, tolerance=tolerance)
    if ".npz" in files:
        write_npz(files[".npz"], arrays=payload.arrays or {}, metadata=metadata, tolerance=tolerance)
    if ".png" in files:
        write_png(files[".png"], payload.png)
        write_json(directory / "metadata.json", values={}, metadata=metadata, tolerance=None)
    return list(files.values())


class EQCheckItem(pytest.Item):
    """One check of a generated suite."""

    def __init__(self, *, check: Check, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check
        self.add_marker("easyquant")

    @property
    def eq_session(self) -> EQSession:
        return get_session(self.config)

    @property
    def files(self) -> list[Path]:
        directory = self.eq_session.baseline_dir(self.parent.eq_request)
        return list(_files(self.check, directory).values())

    def runtest(self) -> None:
        session = self.eq_session
        request = self.parent.eq_request
        notes = list(session.plan(request).notes)

        def obtain() -> Payload:
            run = session.run(request)
            obtained = self.check.obtain(run)
            if obtained.problems:
                raise PipelineError("; ".join(obtained.problems))
            if run.degenerate:
                if not session.options.allow_degenerate:
                    raise PipelineError(degenerate_message(request, run.degenerate))
                notes.append(f"degenerate outputs recorded anyway (--eq-allow-degenerate): {run.degenerate}")
            return obtained

        verify(
            self,
            session,
            self.check,
            obtain,
            directory=session.baseline_dir(request),
            metadata=lambda: session.metadata(request),
            suite=self.parent.name,
            missing_hint=lambda: session.recorded_recipes_hint(request) or session.recorded_backend_hint(request),
            commands=FixCommands(
                record=lambda: record_missing_command(self.config, session.options, request),
                rerecord=lambda: rerecord_check_command(self.config, session.options, request, self.check.name),
            ),
            notes=notes,
        )

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, QUIET_ERRORS):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, f"{self.parent.name}::{self.name}"


@dataclass(frozen=True)
class FixCommands:
    """How to repair a check's baselines, as printed: ``record()`` records the missing ones (of
    the whole model run), ``rerecord()`` re-records this check's."""

    record: Callable[[], str]
    rerecord: Callable[[], str]


def _user_test_commands(node: pytest.Item, session: EQSession) -> FixCommands:
    return FixCommands(
        record=lambda: user_test_command(node, session.options, update="--eq-update-new-only"),
        rerecord=lambda: user_test_command(node, session.options, update="--eq-update-baselines"),
    )


def verify(
    node: pytest.Item,
    session: EQSession,
    check: Any,
    obtain: Any,
    *,
    directory: Path,
    metadata: Any,
    suite: str,
    extra_rules: list[Any] = (),
    missing_hint: Callable[[], str] | None = None,
    commands: FixCommands | None = None,
    notes: list[str] | None = None,
) -> None:
    """The one routine every check goes through: obtain, then write (update modes) or compare.

    ``check`` has ``name``, ``storage_key``, ``suffixes`` and ``compare``; ``obtain()`` returns its
    Payload; ``metadata()`` the current BaselineMetadata; ``missing_hint()``, a line for the
    summary when baselines are missing; ``commands``, how to repair them (default: rerun the
    user's test); ``notes``, the summary's remarks on the model run (the outcome keeps the list
    itself, so ``obtain()`` may still add to it). Raises CheckFailure / BaselineError. The outcome
    also goes to the JUnit XML properties of ``node``.
    """
    worker = getattr(session.config, "workerinput", {}).get("workerid", "")
    outcome = Outcome(
        nodeid=node.nodeid, suite=suite, check=check.name, status="error", worker=worker,
        notes=notes if notes is not None else [],
    )
    session.record(outcome)
    commands = commands or _user_test_commands(node, session)
    try:
        _settle(node, session, check, obtain(), directory, metadata, outcome, list(extra_rules), missing_hint, commands)
    except QUIET_ERRORS as exc:
        outcome.message = str(exc)
        if isinstance(exc, CheckFailure):
            outcome.status = "failed"
        raise
    except Exception as exc:
        outcome.message = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        node.user_properties.extend(check_properties(outcome.check, outcome.status, outcome.rows))


def _settle(
    node: pytest.Item,
    session: EQSession,
    check: Any,
    obtained: Payload,
    directory: Path,
    metadata: Any,
    outcome: Outcome,
    extra_rules: list[Any],
    missing_hint: Callable[[], str] | None,
    commands: FixCommands,
) -> None:
    options = session.options
    files = _files(check, directory)
    for path in files.values():
        session.tracker.mark(path)
    missing = not all(path.exists() for path in files.values())
    results_dir = options.results_dir / sanitize(outcome.suite)
    outcome.summary_lines = list(obtained.notes)
    for name, data in obtained.attachments.items():
        atomic_write_bytes(results_dir / name, data)
        outcome.artifacts.append(str(results_dir / name))
    if options.update_baselines or (options.update_new_only and missing):
        table = tolerance_table(node, options, stored=None, extra=extra_rules)
        rows = check.compare(obtained, obtained, table, results_dir=results_dir) if obtained.png is None else []
        recorded = {row.metric: {"atol": row.tolerance.atol, "rtol": row.tolerance.rtol} for row in rows}
        write_payload(check, directory, obtained, metadata(), recorded)
        outcome.status = "written"
        outcome.rows = [MetricRecord.from_row(row, written=True) for row in rows]
        return
    try:
        stored = read_payload(check, directory)
    except BaselineError as exc:
        # What the check obtained still goes to the reports, as "now" without a baseline.
        table = tolerance_table(node, options, stored=None, extra=extra_rules)
        rows = check.compare(obtained, obtained, table, results_dir=results_dir) if obtained.png is None else []
        outcome.rows = [MetricRecord.from_row(row, written=True) for row in rows]
        if not isinstance(exc, MissingBaseline):
            raise BaselineError(f"{exc.reason}; re-record it with: {commands.rerecord()}", path=exc.path) from None
        outcome.status = "missing"
        outcome.command = commands.record()
        outcome.hint = missing_hint() if missing_hint is not None else ""
        where = _shown_path(exc.path, session.config.rootpath)
        raise MissingBaseline(
            f"no baseline at {where} (the easyquant summary has the command that records it)", path=exc.path
        ) from None
    table = tolerance_table(node, options, stored=stored.tolerance, extra=extra_rules)
    rows = check.compare(stored.payload, obtained, table, results_dir=results_dir)
    now = metadata()
    differences = stored.metadata.differences(now) if stored.metadata is not None else []
    report = CheckReport(name=node.nodeid, rows=rows, metadata_differences=differences, extra=[])
    if not report.passed and stored.metadata is not None:
        notes = [stored.metadata.kernels_note(now)]
        if obtained.png is not None:
            notes.append(stored.metadata.rendering_note(now))
        report.extra += [f"{note}: {commands.rerecord()}" for note in notes if note]
    outcome.rows = [MetricRecord.from_row(row) for row in rows]
    outcome.artifacts += [a for row in rows for a in getattr(row, "artifacts", ())]
    outcome.metadata_differences = differences + report.extra
    outcome.status = "passed" if report.passed else "failed"
    run_check(report)


def degenerate_message(request: Any, problem: str) -> str:
    """The one line a degenerate model run fails with: what was seen and what to do."""
    return (
        f"model {request.model!r} gives degenerate outputs on the evaluation data: {problem}; its baselines "
        "would guard nothing. Use trained weights (--eq-weights) or a model whose outputs vary with the "
        "input, or pass --eq-allow-degenerate to record them anyway"
    )


def _shown_path(path: Path | None, root: Path) -> str:
    """``path`` relative to the rootdir when inside it (shorter in a one-line reason)."""
    if path is None:
        return "(unknown)"
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def build_suites(session: EQSession, parent: pytest.Session) -> list[pytest.Item]:
    """The generated items of every ``--eq-model``; UsageError when a model cannot be prepared."""
    items: list[pytest.Item] = []
    for model in session.options.models:
        request = session.request_for(model)
        try:
            plan = session.plan(request)
        except PipelineError as exc:
            raise pytest.UsageError(f"--eq-model {model}: {exc}") from None
        checks = plan_checks(plan, plots=not session.options.no_plots, sensitivity=not session.options.no_sensitivity)
        switched_off = [c for c in every_check(plan) if c not in checks]
        name = suite_name(request, session.config.rootpath)
        session.backend_notes[name] = f"backend {plan.prepared.backend} ({plan.prepared.backend_note})"
        suite = EQSuite.from_parent(parent, name=name, nodeid=name, request=request, checks=checks)
        suite.ihook.pytest_collectstart(collector=suite)
        suite_items = suite.collect()
        for item in suite_items:
            item.ihook.pytest_itemcollected(item=item)
        report = pytest.CollectReport(suite.nodeid, "passed", None, list(suite_items))
        suite.ihook.pytest_collectreport(report=report)
        directory = session.baseline_dir(request)
        session.suite_dirs.add(directory)
        for item in suite_items:
            session.expected_files.update(item.files)
        # Checks an option turned off (--eq-no-plots, ...) keep their baselines "used".
        session.expected_files.update(path for check in switched_off for path in _files(check, directory).values())
        session.runs_info[name] = session.run_info(name, request)
        session.generated_count += len(suite_items)
        items.extend(suite_items)
    return items


def every_check(plan: Any) -> list[Check]:
    """The checks ``plan_checks`` plans with every one of its switches on: its keyword-only
    boolean parameters (``plots``, ...) are the options that turn checks off."""
    switches = [
        name for name, parameter in inspect.signature(plan_checks).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    return plan_checks(plan, **dict.fromkeys(switches, True))
