"""Per-session state: planned and executed model runs, outcomes for the reports, baseline usage.

One :class:`EQSession` lives in ``config.stash``. Model runs are computed once per process (so
once per xdist worker) and shared by every check and fixture that needs them; a failed run is
remembered and reported by each of its checks as the same one line.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_easyquant.baseline_usage import UsageTracker
from pytest_easyquant.naming import baseline_dir
from pytest_easyquant.options import EQConfig
from pytest_easyquant.registry import Registry
from pytest_easyquant.storage import BaselineMetadata


class PipelineError(Exception):
    """The model could not be prepared or run; the message is one line for the user."""


@dataclass
class Outcome:
    """What one check did, in a JSON-friendly form (workers send these to the controller)."""

    nodeid: str
    suite: str
    check: str
    status: str  # passed | failed | written | missing | error
    rows: list[list[Any]] = field(default_factory=list)
    message: str = ""
    artifacts: list[str] = field(default_factory=list)
    command: str = ""  # a missing baseline's: the command that records it
    hint: str = ""  # a missing baseline's pointer to the model's recorded recipes

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        return cls(**data)


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
        self.backend_notes: dict[str, str] = {}  # suite name -> which backend prepared it and why

    def request_for(self, model: str, **overrides: Any) -> Any:
        from pytest_easyquant.pipeline import RunRequest

        o = self.options
        values = dict(
            model=model, weights=o.weights, data=o.data, recipe=o.recipe, cle=o.cle, device=o.device,
            seed=o.seed, calib_batches=o.calib_batches, batch_size=o.batch_size, sa_batches=o.sa_batches,
            backend=o.backend,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return RunRequest(**values)

    def plan(self, request: Any) -> Any:
        """The cheap part of a run (model, data, quantizers); PipelineError on bad input."""
        if request not in self._plans:
            from pytest_easyquant.pipeline import describe_error, plan

            try:
                self._plans[request] = plan(request, self.registry)
            except Exception as exc:  # any failure here is the user's input; report it as one line
                self._plans[request] = PipelineError(describe_error(exc))
        result = self._plans[request]
        if isinstance(result, PipelineError):
            raise result
        return result

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
                recorded = read_json(self.baseline_dir(request) / stored).metadata.backend
                break
            except Exception:  # noqa: BLE001 - no readable metadata there
                continue
        if recorded is None:
            return ""
        now = self.plan(request).prepared.backend
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
            backend=plan.prepared.backend,
            libraries=tuple(
                name for name, used in (
                    ("torchao", plan.prepared.backend == "pt2e"),
                    ("timm", request.model.startswith("timm:")),
                    ("transformers", request.model.startswith("hf:")),
                ) if used
            ),
        )

    def update_command(self) -> str:
        """The user's command line with the flag that records missing baselines."""
        args = [a for a in self.config.invocation_params.args if a not in ("--eq-update-baselines", "--eq-update-new-only")]
        return shlex.join(["pytest", *args, "--eq-update-new-only"])

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def unused_baselines(self) -> list[Path]:
        return self.tracker.unused(sorted(self.suite_dirs), self.expected_files)


SESSION_KEY = pytest.StashKey[EQSession]()


def get_session(config: pytest.Config) -> EQSession:
    return config.stash[SESSION_KEY]
