"""pytest entry point: options, markers, fixtures and the hooks that add generated suites.

The work lives elsewhere: ``options`` (the option table), ``suite`` (generated items),
``fixtures`` (users' fixtures), ``session`` (state), ``reporting`` (terminal), ``report``
(HTML dashboard, JSON summary).
Importing this module stays cheap: torch is imported only once a suite or fixture needs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_easyquant import options as eq_options
from pytest_easyquant.fixtures import (  # noqa: F401 - fixtures are registered by being here
    eq_baseline,
    eq_config,
    eq_loaders,
    eq_model,
    eq_prepared,
    eq_request,
    eq_run,
    eq_sa,
)
from pytest_easyquant.registry import Registry, RegistryHooks
from pytest_easyquant.report.records import RunInfo
from pytest_easyquant.session import SESSION_KEY, EQSession, Outcome, get_session

MARKERS = (
    "easyquant: a check of a generated pytest-easyquant suite",
    "eq_model(name, weights=None, data=None): run this test's easyquant fixtures on this model",
    "eq_recipe(name): quantize this test's model with this recipe",
    "eq_backend(name): prepare this test's model with this backend (auto, fx or pt2e)",
    "eq_tolerance(*rules, metric='*', atol=0, rtol=0): tolerance for this test's baseline checks, "
    "as '<metric-glob> atol=<x> rtol=<y>' strings or keywords",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    eq_options.register(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(RegistryHooks)


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    registry = Registry()
    config.hook.pytest_easyquant_register(registry=registry)
    config.stash[SESSION_KEY] = EQSession(config, eq_options.resolve(config), registry)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(), "easyquant-xdist")
        # Keep each model's checks on one worker (a suite is one scope), so each worker runs
        # each model at most once; users' tests are then distributed by module.
        if getattr(config.option, "dist", None) == "load" and get_session(config).options.models:
            config.option.dist = "loadscope"


def _is_xdist_controller(config: pytest.Config) -> bool:
    return getattr(config.option, "numprocesses", None) not in (None, 0) and not hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    eq_session = get_session(config)
    if eq_session.options.models:
        from pytest_easyquant.suite import build_suites

        items.extend(build_suites(eq_session, session))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Which model runs the selection kept: unused baselines are looked for only there."""
    from pytest_easyquant.suite import EQCheckItem

    eq_session = get_session(session.config)
    selected = [item for item in session.items if isinstance(item, EQCheckItem)]
    eq_session.selected_dirs = {eq_session.baseline_dir(item.parent.eq_request) for item in selected}
    eq_session.selective = len(selected) < eq_session.generated_count


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    """Which backend prepared each generated suite, and why (``--eq-backend auto`` decides)."""
    return [f"{suite}: {note}" for suite, note in sorted(get_session(config).backend_notes.items())]


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    eq_session = get_session(config)
    if hasattr(config, "workerinput"):
        config.workeroutput["easyquant"] = json.dumps(
            {
                "outcomes": [o.to_dict() for o in eq_session.outcomes],
                "unused": [str(p) for p in eq_session.unused_baselines()],
                "runs": [info.to_dict() for info in eq_session.runs_info.values()],
            }
        )
        return
    if not _is_xdist_controller(config):
        eq_session.unused = [str(path) for path in eq_session.unused_baselines()]
    _settle_unused(session, eq_session)
    if eq_session.outcomes:
        from pytest_easyquant.report.html import write_html_report

        eq_session.report_path = write_html_report(eq_session)
    if eq_session.options.json is not None:
        from pytest_easyquant.report.json_summary import write_json_summary

        eq_session.json_path = write_json_summary(eq_session, exitstatus=int(session.exitstatus))


def _settle_unused(session: pytest.Session, eq_session: EQSession) -> None:
    """``--eq-prune-unused`` deletes the unused baselines; ``--eq-fail-unused`` fails on any left."""
    if eq_session.unused and eq_session.options.prune_unused:
        from pytest_easyquant.baseline_usage import prune

        deleted = prune([Path(p) for p in eq_session.unused], eq_session.options.baseline_dir)
        eq_session.pruned = [str(p) for p in deleted]
        eq_session.unused = [p for p in eq_session.unused if p not in set(eq_session.pruned)]
    if eq_session.unused and eq_session.options.fail_unused and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    eq_session = get_session(config)
    if eq_session.outcomes or eq_session.unused or eq_session.pruned:
        from pytest_easyquant.reporting import terminal_summary

        terminal_summary(terminalreporter, eq_session)


class _XdistHooks:
    """Collects the workers' outcomes on the controller (only registered with pytest-xdist)."""

    def pytest_testnodedown(self, node: object, error: object) -> None:
        output = getattr(node, "workeroutput", {}).get("easyquant")
        if not output:
            return
        data = json.loads(output)
        eq_session = get_session(node.config)
        eq_session.outcomes.extend(Outcome.from_dict(o) for o in data["outcomes"])
        for info in data.get("runs", []):
            eq_session.runs_info.setdefault(info["suite"], RunInfo.from_dict(info))
        # A file is unused when no worker used it: every worker collected every suite.
        unused = set(data["unused"])
        if eq_session.workers_reported:
            unused &= set(eq_session.unused)
        eq_session.unused = sorted(unused)
        eq_session.workers_reported += 1
