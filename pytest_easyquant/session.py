"""Per-session state: planned and executed model runs, outcomes for the reports, baseline usage.

One :class:`EQSession` lives in ``config.stash``. Model runs are computed once per process (so
once per xdist worker) and shared by every check and fixture that needs them; a failed run is
remembered and reported by each of its checks as the same one line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_easyquant.baseline_usage import UsageTracker
from pytest_easyquant.naming import baseline_dir
from pytest_easyquant.options import EQConfig
from pytest_easyquant.registry import Registry
from pytest_easyquant.report.records import VERSION_LABELS, MetricRecord, RunInfo
from pytest_easyquant.storage import BaselineMetadata


class PipelineError(Exception):
    """The model could not be prepared or run; the message is one line for the user."""


@dataclass
class Outcome:
    """What one check did, in a JSON-friendly form (workers send these to the controller).

    ``worker`` is the xdist worker that ran it ("" without xdist); ``metadata_differences`` what
    changed since its baseline was recorded.
    """

    nodeid: str
    suite: str
    check: str
    status: str  # passed | failed | written | missing | error
    rows: list[MetricRecord] = field(default_factory=list)
    message: str = ""
    artifacts: list[str] = field(default_factory=list)
    command: str = ""  # a missing baseline's: the command that records it
    hint: str = ""  # a missing baseline's pointer to the model's recorded recipes
    worker: str = ""
    metadata_differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the model run's one-line remarks for the summary
    summary_lines: list[str] = field(default_factory=list)  # a check's own lines (sensitivity's top layers)

    def to_dict(self) -> dict[str, Any]:
        data = dict(vars(self))
        data["rows"] = [row.to_dict() for row in self.rows]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        values = dict(data)
        values["rows"] = [MetricRecord.from_dict(row) for row in values.get("rows", [])]
        return cls(**values)


class EQSession:
    """The plugin's state for one pytest process."""

    def __init__(self, config: pytest.Config, options: EQConfig, registry: Registry) -> None:
        self.config = config
        self.options = options
        self.registry = registry
        self._plans: dict[Any, Any] = {}
        self._runs: dict[Any, Any] = {}
        self.tracker = UsageTracker()
        self.outcomes: list[Outcome] = []
        self.expected_files: set[Path] = set()
        self.suite_dirs: set[Path] = set()
        self.unused: list[str] = []
        self.report_path: Path | None = None
        self.runs_info: dict[str, RunInfo] = {}
        self.selected_dirs: set[Path] | None = None  # None until collection is finished
        self.selective = False  # whether -k/-m/--lf deselected some generated check
        self.generated_count = 0  # generated checks collected, before any deselection
        self.pruned: list[str] = []
        self.workers_reported = 0
        self.json_path: Path | None = None
        self.backend_notes: dict[str, str] = {}  # suite name -> which backend prepared it and why

    def request_for(self, model: str, **overrides: Any) -> Any:
        from pytest_easyquant.pipeline import RunRequest

        o = self.options
        values = dict(
            model=model, weights=o.weights, data=o.data, recipe=o.recipe, cle=o.cle, device=o.device,
            seed=o.seed, calib_batches=o.calib_batches, batch_size=o.batch_size, sa_batches=o.sa_batches,
            mixed_precision=o.mixed_precision,
            backend=o.backend,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return RunRequest(**values)

    def plan(self, request: Any) -> Any:
        """The cheap part of a run (model, data, quantizers); PipelineError on bad input."""
        if request not in self._plans:
            from pytest_easyquant.pipeline import describe_error, plan

            if ":" in request.model:
                self._importable_from_rootdir()
            try:
                self._plans[request] = plan(request, self.registry)
            except Exception as exc:  # any failure here is the user's input; report it as one line
                self._plans[request] = PipelineError(describe_error(exc))
        result = self._plans[request]
        if isinstance(result, PipelineError):
            raise result
        return result

    def _importable_from_rootdir(self) -> None:
        """Let ``--eq-model pkg.mod:build`` import from the rootdir, as pytest's ``pythonpath`` would.

        Appended, so an installed module or one already on the path still wins; it stays on
        ``sys.path`` for the rest of the process.
        """
        root = str(self.config.rootpath)
        if root not in sys.path:
            sys.path.append(root)

    def run(self, request: Any) -> Any:
        """Calibrate, evaluate and analyse once; later calls get the cached result or error."""
        if request not in self._runs:
            from pytest_easyquant.pipeline import ModelRun, describe_error

            try:
                self._runs[request] = ModelRun.execute(self.plan(request))
            except PipelineError as exc:
                self._runs[request] = exc
            except Exception as exc:  # noqa: BLE001 - one line per check instead of a traceback
                self._runs[request] = PipelineError(
                    f"running model {request.model!r} failed: {describe_error(exc)}"
                )
        result = self._runs[request]
        if isinstance(result, PipelineError):
            raise result
        return result

    def baseline_dir(self, request: Any) -> Path:
        recipe = self.options.baseline_recipe or request.recipe
        return baseline_dir(
            self.options.baseline_dir,
            model=request.model,
            weights=request.weights,
            recipe=recipe,
            weights_root=self.config.rootpath,
        )

    def recorded_recipes_hint(self, request: Any) -> str:
        """When this run's recipe has no baselines but others of the model do, how to compare."""
        directory = self.baseline_dir(request)
        if self.options.baseline_recipe or directory.exists() or not directory.parent.is_dir():
            return ""
        recipes = sorted(p.name for p in directory.parent.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not recipes:
            return ""
        return (
            f"baselines of this model exist for recipe {', '.join(recipes)}: to see what moves against "
            f"them, run with --eq-baseline-recipe {recipes[0]}"
        )

    def recorded_backend_hint(self, request: Any) -> str:
        """When this run's baselines were recorded with another backend (whose quantizer names
        differ), which one, and how to compare against them."""
        from pytest_easyquant.storage import read_json

        recorded = None
        for stored in ("metadata.json", "fidelity.json"):  # the latter exists in every suite
            try:
                # baselines from before the backend was recorded (None) were all FX
                recorded = read_json(self.baseline_dir(request) / stored).metadata.backend or "fx"
                break
            except Exception:  # noqa: BLE001 - no readable metadata there
                continue
        if recorded is None:
            return ""
        now = self.plan(request).backend
        if recorded == now:
            return ""
        return (
            f"these baselines were recorded with backend {recorded}, but this run prepared the model with "
            f"{now}: run with --eq-backend {recorded} to compare against them, or re-record them"
        )

    def metadata(self, request: Any) -> BaselineMetadata:
        plan = self.plan(request)
        return BaselineMetadata.current(
            model=request.model,
            weights=request.weights,
            recipe=plan.recipe.to_dict(),
            data=plan.data_name,
            seed=request.seed,
            calib_batches=request.calib_batches,
            device=request.device,
            backend=plan.backend,
            libraries=tuple(
                name for name, used in (
                    ("torchao", plan.backend == "pt2e"),
                    ("timm", request.model.startswith("timm:")),
                    ("transformers", request.model.startswith("hf:")),
                ) if used
            ),
        )

    def run_info(self, suite: str, request: Any) -> RunInfo:
        """The report's description of a model run (cheap: the plan is already built)."""
        from pytest_easyquant.commands import record_missing_command

        plan = self.plan(request)
        metadata = self.metadata(request)
        versions = {name: str(getattr(metadata, name)) for name, _ in VERSION_LABELS}
        return RunInfo(
            suite=suite, model=request.model, weights=request.weights, recipe=request.recipe,
            baseline_recipe=self.options.baseline_recipe, backend=plan.backend, data=plan.data_name,
            seed=request.seed, device=request.device, cle=request.cle, calib_batches=request.calib_batches,
            batch_size=request.batch_size, sa_batches=request.sa_batches,
            baseline_dir=str(self.baseline_dir(request)),
            record_command=record_missing_command(self.config, self.options, request),
            versions=versions, layers=list(plan.weight_modules),
        )

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def unused_baselines(self) -> list[Path]:
        """Baseline files no check of this session uses, respecting the selection.

        Only the selected model runs' directories are searched, and files of deselected checks
        and of checks an option turned off count as used. When the models come from the ini
        file's ``eq_model`` (the project's list of guarded models, as a test suite's files are)
        and nothing was deselected, the directories of models recorded with the same weights and
        recipe but no longer listed are unused as a whole; ``--eq-model`` on the command line
        selects models, like naming test files, and leaves the others' baselines alone.
        """
        from pytest_easyquant.baseline_usage import stale_model_dirs

        directories = set(self.suite_dirs if self.selected_dirs is None else self.selected_dirs)
        declared = self.options.source.get("model", "").startswith("ini")
        if declared and not self.selective and self.suite_dirs:
            directories |= set(stale_model_dirs(self.options.baseline_dir, self.suite_dirs))
        return self.tracker.unused(sorted(directories), self.expected_files)


SESSION_KEY = pytest.StashKey[EQSession]()


def get_session(config: pytest.Config) -> EQSession:
    return config.stash[SESSION_KEY]
