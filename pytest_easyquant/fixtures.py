"""Fixtures for users' own tests: the model, data, prepared model, SA results and baselines.

A test picks its model with ``@pytest.mark.eq_model("digits")`` (else the first ``--eq-model``)
and its recipe with ``@pytest.mark.eq_recipe("w4a8")`` (else ``--eq-recipe``). Everything is
computed once per session and shared with the generated suites.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_easyquant.check_report import Row
from pytest_easyquant.checks import Payload
from pytest_easyquant.compare import compare_array, compare_values
from pytest_easyquant.errors import BaselineError, CheckFailure
from pytest_easyquant.image_compare import compare_image
from pytest_easyquant.naming import sanitize
from pytest_easyquant.options import EQConfig
from pytest_easyquant.session import EQSession, PipelineError, get_session
from pytest_easyquant.storage import BaselineMetadata
from pytest_easyquant.tolerances import Tolerance, ToleranceRule, ToleranceTable, parse_rule


def _session(config: pytest.Config) -> EQSession:
    return get_session(config)


@pytest.fixture(scope="session")
def eq_config(pytestconfig: pytest.Config) -> EQConfig:
    """The resolved easyquant options of this session."""
    return _session(pytestconfig).options


@pytest.fixture
def eq_request(request: pytest.FixtureRequest) -> Any:
    """What this test's model run is: the eq_model / eq_recipe markers override the options."""
    session = _session(request.config)
    model_marker = request.node.get_closest_marker("eq_model")
    recipe_marker = request.node.get_closest_marker("eq_recipe")
    backend_marker = request.node.get_closest_marker("eq_backend")
    overrides: dict[str, Any] = {}
    if model_marker is not None:
        if not model_marker.args:
            pytest.fail("@pytest.mark.eq_model needs a model name, e.g. eq_model('digits')", pytrace=False)
        model = str(model_marker.args[0])
        overrides.update({k: model_marker.kwargs.get(k) for k in ("weights", "data")})
    elif session.options.models:
        model = session.options.models[0]
    else:
        pytest.fail(
            "no model for this test: mark it with @pytest.mark.eq_model('<name>') or pass --eq-model",
            pytrace=False,
        )
    if recipe_marker is not None:
        overrides["recipe"] = str(recipe_marker.args[0])
    if backend_marker is not None:
        from pytest_easyquant.options import BACKENDS

        backend = str(backend_marker.args[0]) if backend_marker.args else ""
        if backend not in BACKENDS:
            pytest.fail(f"@pytest.mark.eq_backend expects one of {', '.join(BACKENDS)}, got {backend!r}", pytrace=False)
        overrides["backend"] = backend
    return session.request_for(model, **overrides)


def _or_fail(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except PipelineError as exc:
        message = str(exc)
    # Failing outside the except block, so the report is the one line, not a chain of two.
    pytest.fail(message, pytrace=False)


@pytest.fixture
def eq_model(request: pytest.FixtureRequest, eq_request: Any) -> Any:
    """The float model as an ``eqcore.models.zoo.ZooModel`` (``.model``, ``.spec``, ``.labels``)."""
    return _or_fail(_session(request.config).plan, eq_request).zoo


@pytest.fixture
def eq_loaders(request: pytest.FixtureRequest, eq_request: Any) -> Any:
    """Calibration and evaluation loaders (``eqcore.models.loaders.Loaders``)."""
    return _or_fail(_session(request.config).plan, eq_request).loaders


@pytest.fixture
def eq_run(request: pytest.FixtureRequest, eq_request: Any) -> Any:
    """The whole model run: evaluations, fidelity, per-layer SQNR, qparams and SA results."""
    return _or_fail(_session(request.config).run, eq_request)


@pytest.fixture
def eq_prepared(eq_run: Any) -> Any:
    """The calibrated fake-quant model (``eqcore.prepare.quantize.PreparedModel``: ``.model``, ``.float_model``)."""
    return eq_run.plan.prepared


@pytest.fixture
def eq_sa(eq_run: Any) -> Any:
    """The sensitivity-analysis results (``eqcore.analysis.sa_run.SAResult``)."""
    return eq_run.sa


@dataclass(frozen=True)
class _CustomCheck:
    name: str
    suffix: str

    @property
    def storage_key(self) -> str:
        return self.name

    @property
    def suffixes(self) -> tuple[str, ...]:
        return (self.suffix,)

    def compare(self, stored: Payload, obtained: Payload, table: ToleranceTable, *, results_dir: Path) -> list[Row]:
        if self.suffix == ".png":
            tolerance, source = table.resolve(f"image.{self.name}")
            return [compare_image(f"image.{self.name}", stored.png, obtained.png, tolerance, source, results_dir=results_dir)]
        if self.suffix == ".npz":
            rows = []
            for key in sorted(set(stored.arrays or {}) | set(obtained.arrays or {})):
                metric = f"{self.name}.{key}"
                tolerance, source = table.resolve(metric)
                if key not in (stored.arrays or {}) or key not in (obtained.arrays or {}):
                    where = "not in baseline (new array)" if key not in (stored.arrays or {}) else "missing now"
                    rows.append(Row(metric, None, None, tolerance, source, False, where))
                else:
                    rows.append(compare_array(metric, stored.arrays[key], obtained.arrays[key], tolerance, source))
            return rows
        return compare_values(self.name, stored.values or {}, obtained.values or {}, table)


def _plain(value: Any) -> Any:
    """Tensors and numpy values as JSON-friendly Python values."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _BadTolerances(ValueError):
    """A check's ``tolerances=`` argument cannot be read."""


def _rules(tolerances: Mapping[str, Any] | None, default_metric: str) -> list[ToleranceRule]:
    rules = []
    try:
        for pattern, spec in (tolerances or {}).items():
            if isinstance(spec, str):
                rules.append(parse_rule(f"{pattern} {spec}", source="marker"))
            elif isinstance(spec, Mapping):
                rules.append(ToleranceRule(pattern=pattern, tolerance=Tolerance(**{k: float(v) for k, v in spec.items()}), source="marker"))
            else:
                rules.append(ToleranceRule(pattern=pattern, tolerance=Tolerance(atol=float(spec)), source="marker"))
    except (AttributeError, TypeError, ValueError) as exc:
        raise _BadTolerances(str(exc)) from None
    return rules


class BaselineChecker:
    """``eq_baseline``: compare a test's own values, arrays and figures with stored baselines.

    Files go to ``<baseline-dir>/tests/<test module>/<test name>/<name>.{json,npz,png}``; every
    name is sanitised, so nothing is written outside the baseline directory. Tolerances come
    from ``tolerances=`` (per metric glob), then markers, CLI, ini, the baseline's own, defaults.
    """

    def __init__(self, node: pytest.Item, session: EQSession) -> None:
        self.node = node
        self.session = session
        module = Path(str(node.path)).stem if getattr(node, "path", None) else "tests"
        self.directory = session.options.baseline_dir / "tests" / sanitize(module) / sanitize(node.name)

    def _metadata(self) -> BaselineMetadata:
        o = self.session.options
        return BaselineMetadata.current(
            model="(test)", weights="none", recipe={}, data="", seed=o.seed, calib_batches=o.calib_batches, device=o.device
        )

    def _verify(self, check: _CustomCheck, payload: Payload, tolerances: Mapping[str, Any] | None) -> None:
        from pytest_easyquant.suite import verify

        try:
            extra_rules = _rules(tolerances, check.name)
            verify(
                self.node, self.session, check, lambda: payload,
                directory=self.directory, metadata=self._metadata, suite=f"tests/{self.node.name}",
                extra_rules=extra_rules,
            )
        except _BadTolerances as exc:
            message = f"bad tolerances= for {check.name!r}: {exc}"
        except (CheckFailure, BaselineError) as exc:
            message = str(exc)
        else:
            return
        pytest.fail(message, pytrace=False)

    def check(self, name: str, values: Mapping[str, Any], *, tolerances: Mapping[str, Any] | None = None) -> None:
        """Compare a (nested) mapping of numbers, lists and strings, stored as JSON."""
        self._verify(_CustomCheck(name, ".json"), Payload(values=_plain(dict(values))), tolerances)

    def check_arrays(self, name: str, arrays: Mapping[str, Any], *, tolerances: Mapping[str, Any] | None = None) -> None:
        """Compare named arrays (numpy or torch), stored as NPZ."""
        import numpy as np

        plain = {str(k): np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in arrays.items()}
        self._verify(_CustomCheck(name, ".npz"), Payload(arrays=plain), tolerances)

    def check_image(self, figure_or_path: Any, name: str | None = None, *, tolerance: float | None = None) -> None:
        """Compare a matplotlib Figure (rendered deterministically) or a PNG file by RMS."""
        if isinstance(figure_or_path, (str, Path)):
            png = Path(figure_or_path).read_bytes()
            name = name or Path(figure_or_path).stem
        else:
            from eqcore.plots.png import figure_to_png

            png = figure_to_png(figure_or_path)
            name = name or "figure"
        tolerances = {f"image.{name}": {"atol": tolerance}} if tolerance is not None else None
        self._verify(_CustomCheck(name, ".png"), Payload(png=png), tolerances)


@pytest.fixture
def eq_baseline(request: pytest.FixtureRequest) -> BaselineChecker:
    """Check values, arrays and images against baselines (see :class:`BaselineChecker`)."""
    return BaselineChecker(request.node, _session(request.config))
