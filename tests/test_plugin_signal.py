"""The plugin refuses degenerate models, scores heads of any size sensibly, and imports users'
factories from the rootdir: real pytest sessions (pytester) on small factory models."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pytest_easyquant.pipeline  # noqa: F401 - imported once, not in every in-process session
import pytest_easyquant.reporting  # noqa: F401

from test_plugin import one_torch_thread  # noqa: F401 - autouse fixture, shared

pytest_plugins = ["pytester"]

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TenClass(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 5, stride=4)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.relu(self.conv(x)).mean((2, 3)))


    class Zeros(TenClass):
        def forward(self, x):
            return super().forward(x) * 0.0


    def ten_class():
        return TenClass()


    def zeros():
        return Zeros()


    def broken():
        raise RuntimeError("the weights server is unreachable")
    """
)
QUICK = ("-p", "no:cacheprovider", "--eq-no-plots", "--eq-calib-batches", "1")


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A directory holding ``signal_models.py`` and nothing else: no conftest, no ini."""
    (pytester.path / "signal_models.py").write_text(MODELS)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess(*QUICK, *args)


def text(result: pytest.RunResult) -> str:
    return "\n".join(result.outlines + result.errlines)


def assert_no_internal_traceback(result: pytest.RunResult) -> None:
    output = text(result)
    assert "Traceback" not in output and "pytest_easyquant/" not in output and "eqcore/" not in output, output


def summary_lines(result: pytest.RunResult, prefix: str) -> list[str]:
    return [line.strip() for line in result.outlines if line.strip().startswith(prefix)]


def test_a_model_returning_zeros_fails_with_one_degenerate_line(project: pytest.Pytester) -> None:
    result = run(project, "--eq-model", "signal_models:zeros", "--eq-update-baselines")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] > 5 and "passed" not in outcomes
    expected = (
        "model 'signal_models:zeros' gives degenerate outputs on the evaluation data: the float model's logits "
        "are all zero on all "
    )
    # Every check's failure is that one line, the summary says it once, and nothing was recorded.
    failures = re.findall(r"^_+ easyquant\[\S+\]::\S+ _+\n(.*)$", text(result), re.MULTILINE)
    assert len(failures) == outcomes["failed"] and all(line.startswith(expected) for line in failures)
    assert failures[0].endswith("or pass --eq-allow-degenerate to record them anyway")
    errors = summary_lines(result, "error:")
    assert len(errors) == 1 and errors[0] == f"error: {failures[0]}"
    assert not (project.path / "baselines").exists()
    assert_no_internal_traceback(result)

    allowed = run(project, "--eq-model", "signal_models:zeros", "--eq-update-baselines", "--eq-allow-degenerate")
    assert allowed.ret == 0, text(allowed)
    notes = [n for n in summary_lines(allowed, "note:") if "degenerate" in n]
    assert notes == [
        "note: degenerate outputs recorded anyway (--eq-allow-degenerate): the float model's logits are all zero on all "
        f"{failures[0].split('all zero on all ')[1].split()[0]} inputs"
    ]
    (fidelity,) = project.path.glob("baselines/*/w8a8/fidelity.json")
    assert json.loads(fidelity.read_text())["values"]["cosine_similarity"] == 1.0


def test_a_ten_class_factory_on_imagenet_samples_checks_fidelity_without_accuracy(project: pytest.Pytester) -> None:
    model = ("--eq-model", "signal_models:ten_class")
    note = "note: data 'samples' are unlabeled for this model: 10 outputs, labels up to 999; fidelity is checked, accuracy is not"
    recorded = run(project, *model, "--eq-update-baselines", "-v")
    assert recorded.ret == 0, text(recorded)
    assert summary_lines(recorded, "note:") == [note]
    assert "::accuracy" not in text(recorded) and "::fidelity PASSED" in text(recorded)
    checked = run(project, *model)
    assert checked.ret == 0, text(checked)
    assert summary_lines(checked, "note:") == [note]
    assert re.search(r"fidelity\.sqnr_db\s+\d+\.\d+\s+\d+\.\d+\s+0\s+atol", text(checked)), text(checked)
    assert_no_internal_traceback(checked)


def test_an_image_folder_whose_classes_fit_the_head_gives_accuracy(project: pytest.Pytester) -> None:
    from PIL import Image

    for label in ("0", "3", "9"):
        (project.path / "data" / label).mkdir(parents=True)
        Image.new("RGB", (40, 40), (int(label) * 25, 80, 160)).save(project.path / "data" / label / "a.png")
    result = run(project, "--eq-model", "signal_models:ten_class", "--eq-data", "data", "--eq-update-baselines", "-v")
    assert result.ret == 0, text(result)
    assert "::accuracy PASSED" in text(result) and not summary_lines(result, "note:")
    (accuracy,) = project.path.glob("baselines/*/w8a8/accuracy.json")
    assert json.loads(accuracy.read_text())["values"]["num_labeled"] == 3


def test_a_factory_that_raises_shows_its_own_message(project: pytest.Pytester) -> None:
    result = run(project, "--eq-model", "signal_models:broken")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR:")]
    assert errors == [
        "ERROR: --eq-model signal_models:broken: model 'signal_models:broken': the factory broken() raised "
        "RuntimeError: the weights server is unreachable"
    ]
    assert_no_internal_traceback(result)


@pytest.mark.slow
def test_a_factory_package_imports_from_the_rootdir_without_a_conftest(pytester: pytest.Pytester) -> None:
    # The pytest command itself, as a user runs it: unlike `python -m pytest` (or pytester.run,
    # which adds the directory to PYTHONPATH) it does not put the current directory on sys.path,
    # so only the plugin's rootdir rule makes the package importable.
    package = pytester.path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mymod.py").write_text(MODELS.replace("def ten_class", "def build"))
    command = shutil.which("pytest", path=str(Path(sys.executable).parent))
    assert command, "the pytest command next to this interpreter"
    result = subprocess.run(
        [command, *QUICK, "--eq-model", "mypkg.mymod:build", "--eq-update-baselines"],
        cwd=pytester.path, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert list(pytester.path.glob("baselines/mypkg.mymod-build*/w8a8/fidelity.json"))
