"""The plugin's --eq-backend, registered data, and the new model prefixes' bad input, in real
pytest sessions (pytester) on the tiny models of ``plugin_models.py``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from plugin_models import Tiny
from test_plugin import assert_no_internal_traceback, one_torch_thread, project, run, text  # noqa: F401

pytest_plugins = ["pytester"]

@pytest.fixture(scope="module", autouse=True)
def exported_once() -> Iterator[None]:
    """pytester's in-process sessions drop the modules first imported inside them, and torch.export,
    torchao and timm import lazily and refuse a second import: import (and run) them here first."""
    import timm  # noqa: F401

    from eqcore.prepare.quantize import prepare

    prepare(Tiny().eval(), "w8a8", (torch.randn(2, 3, 16, 16),), backend="pt2e")
    yield


TINY = ("--eq-model", "tiny", "--eq-data", "data", "--eq-no-plots")
TINY_DIR = "baselines/tiny-none/w8a8"

# Models for --eq-model module:callable: one FX cannot trace, one nothing can capture.
BRANCHES = '''
import torch
from plugin_models import TINY_SPEC, Tiny

eq_input_spec = TINY_SPEC


class ShapeBranch(Tiny):
    def forward(self, x):
        if x.shape[1] == 3:
            x = x * 2
        return super().forward(x)


class DataBranch(Tiny):
    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return super().forward(x)


def tensors(spec):
    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(8, *spec.shape, generator=generator)
    evaluation = torch.randn(6, *spec.shape, generator=generator)
    return calib, (evaluation, torch.tensor([0, 1, 0, 1, -1, -1]))
'''


def test_pt2e_baselines_record_the_backend_and_fx_runs_say_so(project: pytest.Pytester) -> None:
    written = run(project, *TINY, "--eq-backend", "pt2e", "--eq-update-baselines")
    assert written.ret == 0, text(written)
    assert "easyquant[tiny-none-w8a8]: backend pt2e (backend pt2e was asked for)" in written.outlines
    metadata = json.loads((project.path / TINY_DIR / "fidelity.json").read_text())["metadata"]
    assert metadata["backend"] == "pt2e"
    assert (project.path / TINY_DIR / "qparams/conv1.output_quant.json").is_file()
    again = run(project, *TINY, "--eq-backend", "pt2e")
    assert again.ret == 0, text(again)
    other = run(project, *TINY, "--eq-backend", "fx")
    assert other.ret == 1
    output = text(other)
    assert "backend: baseline pt2e, now fx" in output or "recorded with backend pt2e" in output
    assert "these baselines were recorded with backend pt2e, but this run prepared the model with fx: " \
           "run with --eq-backend pt2e to compare against them" in output
    assert_no_internal_traceback(other)


def test_backend_from_ini_and_marker(project: pytest.Pytester) -> None:
    project.makeini("[pytest]\neq_backend = pt2e\n")
    project.makepyfile(
        test_user="""
        import pytest

        @pytest.mark.eq_model("tiny", data="data")
        def test_ini(eq_prepared):
            assert eq_prepared.backend == "pt2e"

        @pytest.mark.eq_model("tiny", data="data")
        @pytest.mark.eq_backend("fx")
        def test_marker(eq_prepared):
            assert eq_prepared.backend == "fx"
        """
    )
    result = run(project, "test_user.py")
    assert result.ret == 0, text(result)
    result.assert_outcomes(passed=2)


def test_bad_backend_is_one_usage_error_line(project: pytest.Pytester) -> None:
    result = run(project, *TINY, "--eq-backend", "tvm")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR:")]
    assert errors == ["ERROR: --eq-backend expects one of auto, fx, pt2e, got 'tvm'"], result.errlines


def test_auto_backend_prepares_an_untraceable_model_with_pt2e(project: pytest.Pytester) -> None:
    project.makepyfile(branches=BRANCHES)
    result = run(project, "--eq-model", "branches:ShapeBranch", "--eq-data", "data", "--eq-no-plots",
                 "--eq-update-baselines")
    assert result.ret == 0, text(result)
    assert any("backend pt2e (auto: ShapeBranch does not trace with torch.fx" in line for line in result.outlines)


def test_registered_tensor_data_feeds_the_suite(project: pytest.Pytester) -> None:
    project.makepyfile(branches=BRANCHES)
    project.makeconftest(
        "from plugin_models import pytest_easyquant_register as register_models\n"
        "from branches import tensors\n\n"
        "def pytest_easyquant_register(registry):\n"
        "    register_models(registry)\n"
        "    registry.add_data('my-tensors', tensors)\n"
    )
    result = run(project, "--eq-model", "tiny", "--eq-data", "my-tensors", "--eq-no-plots", "--eq-update-baselines")
    assert result.ret == 0, text(result)
    accuracy = json.loads((project.path / TINY_DIR / "accuracy.json").read_text())
    assert accuracy["values"]["num_labeled"] == 4
    assert json.loads((project.path / TINY_DIR / "fidelity.json").read_text())["metadata"]["data"] == "my-tensors"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        pytest.param("timm:no_such_net", "--eq-model timm:no_such_net: unknown timm model 'no_such_net'", id="timm"),
        pytest.param("hf:missing/config.json", "--eq-model hf:missing/config.json: hf config "
                     "'missing/config.json' is neither a built-in config (bert-tiny, vit-tiny) nor an existing "
                     "config.json", id="hf"),
        pytest.param("branches:DataBranch", "--eq-model branches:DataBranch: DataBranch can be captured neither "
                     "by torch.fx", id="uncapturable"),
    ],
)
def test_bad_models_are_one_error_line(project: pytest.Pytester, model: str, message: str) -> None:
    project.makepyfile(branches=BRANCHES)
    result = run(project, "--eq-model", model, "--eq-data", "data")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR:")]
    assert len(errors) == 1 and errors[0].startswith("ERROR: " + message), result.errlines
    assert_no_internal_traceback(result)
