"""The generated suite: one collector per ``--eq-model``, one item per check.

Node ids are stable (``easyquant[<model>-<weights>-<recipe>]::<check>``), so ``-k``, ``-m``,
``--lf`` and pytest-xdist work on them. Every item goes through the same routine: obtain the
values, then write them (update modes) or read the baseline and compare through
``errors.run_check``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_easyquant.check_report import CheckReport, Row
from pytest_easyquant.checks import Check, Payload, plan_checks
from pytest_easyquant.errors import BaselineError, CheckFailure, run_check
from pytest_easyquant.naming import baseline_file, sanitize, weights_label
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

        def obtain() -> Payload:
            obtained = self.check.obtain(session.run(request))
            if obtained.problems:
                raise PipelineError("; ".join(obtained.problems))
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
        )

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, QUIET_ERRORS):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, f"{self.parent.name}::{self.name}"


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
) -> None:
    """The one routine every check goes through: obtain, then write (update modes) or compare.

    ``check`` has ``name``, ``storage_key``, ``suffixes`` and ``compare``; ``obtain()`` returns its
    Payload; ``metadata()`` the current BaselineMetadata; ``missing_hint()``, a line added to a
    missing-baseline failure. Raises CheckFailure / BaselineError.
    """
    outcome = Outcome(nodeid=node.nodeid, suite=suite, check=check.name, status="error")
    session.record(outcome)
    try:
        _settle(node, session, check, obtain(), directory, metadata, outcome, list(extra_rules), missing_hint)
    except QUIET_ERRORS as exc:
        outcome.message = str(exc)
        if isinstance(exc, CheckFailure):
            outcome.status = "failed"
        raise
    except Exception as exc:
        outcome.message = f"{type(exc).__name__}: {exc}"
        raise


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
) -> None:
    options = session.options
    files = _files(check, directory)
    for path in files.values():
        session.tracker.mark(path)
    missing = not all(path.exists() for path in files.values())
    results_dir = options.results_dir / sanitize(outcome.suite)
    if options.update_baselines or (options.update_new_only and missing):
        table = tolerance_table(node, options, stored=None, extra=extra_rules)
        rows = check.compare(obtained, obtained, table, results_dir=results_dir) if obtained.png is None else []
        recorded = {row.metric: {"atol": row.tolerance.atol, "rtol": row.tolerance.rtol} for row in rows}
        write_payload(check, directory, obtained, metadata(), recorded)
        outcome.status = "written"
        outcome.rows = [_row_list(row, written=True) for row in rows]
        return
    try:
        stored = read_payload(check, directory)
    except MissingBaseline as exc:
        outcome.status = "missing"
        outcome.command = session.update_command()
        message = f"no baseline at {exc.path}; record it with: {outcome.command}"
        outcome.hint = missing_hint() if missing_hint is not None else ""
        raise MissingBaseline(f"{message}\n{outcome.hint}" if outcome.hint else message, path=exc.path) from None
    table = tolerance_table(node, options, stored=stored.tolerance, extra=extra_rules)
    rows = check.compare(stored.payload, obtained, table, results_dir=results_dir)
    differences = stored.metadata.differences(metadata()) if stored.metadata is not None else []
    report = CheckReport(name=node.nodeid, rows=rows, metadata_differences=differences, extra=[])
    outcome.rows = [_row_list(row) for row in rows]
    outcome.artifacts = [a for row in rows for a in getattr(row, "artifacts", ())]
    outcome.status = "passed" if report.passed else "failed"
    run_check(report)


def _row_list(row: Row, *, written: bool = False) -> list[Any]:
    return [
        row.metric,
        None if written else _jsonable(row.baseline),
        _jsonable(row.obtained),
        None if written else _jsonable(row.delta),
        row.tolerance.describe(),
        bool(row.passed),
    ]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def build_suites(session: EQSession, parent: pytest.Session) -> list[pytest.Item]:
    """The generated items of every ``--eq-model``; UsageError when a model cannot be prepared."""
    items: list[pytest.Item] = []
    for model in session.options.models:
        request = session.request_for(model)
        try:
            plan = session.plan(request)
        except PipelineError as exc:
            raise pytest.UsageError(f"--eq-model {model}: {exc}") from None
        checks = plan_checks(plan, plots=not session.options.no_plots)
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
        items.extend(suite_items)
    return items
