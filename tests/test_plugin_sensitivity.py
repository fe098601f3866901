"""The plugin's ``sensitivity`` check, its bar plot, summary lines and the mixed-precision option,
in real pytest sessions (pytester) on the tiny model, and on digits / resnet18 (slow)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import eqcore.plots.sensitivity  # noqa: F401 - imported once, not in every in-process session
import pytest_easyquant.pipeline  # noqa: F401
import pytest_easyquant.reporting  # noqa: F401
from pytest_easyquant.storage import read_json, read_png
from test_plugin import one_torch_thread, project, text  # noqa: F401 - fixtures, shared

pytest_plugins = ["pytester"]

REPO_BASELINES = Path(__file__).resolve().parents[1] / "baselines"
TINY = ("--eq-model", "tiny", "--eq-data", "data", "-p", "no:cacheprovider")
TINY_DIR = Path("baselines/tiny-none/w8a8")
TINY_LAYERS = ["conv1", "conv2", "fc"]
NUMBER = r"-?\d+\.\d+"


def summary_of(result: pytest.RunResult) -> str:
    return text(result).split("easyquant summary", 1)[1]


def test_sensitivity_check_stores_the_sweep_and_shows_it(project: pytest.Pytester) -> None:
    written = project.runpytest_inprocess(*TINY, "-k", "sensitivity", "--eq-update-baselines")
    assert written.ret == 0, text(written)
    written.assert_outcomes(passed=2, deselected=27)
    stored = read_json(project.path / TINY_DIR / "sensitivity.json")
    layers = stored.values["layers"]
    assert sorted(layers) == TINY_LAYERS
    for name, row in layers.items():
        assert row["quantizers"][0] == f"{name}.weight_fake_quant"
        values = [row[f"{kind}_sqnr_db"] for kind in ("isolated", "leave_one_out", "local", "cumulative")]
        assert all(10 < value < 100 for value in values), (name, values)
        assert row["sa_score"] > 0
    assert -1 <= stored.values["spearman_sa_vs_isolated"] <= 1
    assert stored.tolerance["sensitivity.layers.fc.isolated_sqnr_db"] == {"atol": 0.5, "rtol": 0.0}
    assert stored.tolerance["sensitivity.layers.fc.sa_score"] == {"atol": 1e-12, "rtol": 0.05}
    read_png(project.path / TINY_DIR / "plots/sensitivity.png")

    summary = summary_of(written)
    header = summary.index("most sensitive layers")
    rows = re.findall(rf"^\s+(conv1|conv2|fc)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+(\d)$",
                      summary[header:], re.MULTILINE)
    assert [row[0] for row in rows] == sorted(layers, key=lambda n: layers[n]["isolated_sqnr_db"])
    for name, isolated, leave_one_out, *_ in rows:
        assert float(isolated) == pytest.approx(layers[name]["isolated_sqnr_db"], abs=0.005)
        assert float(leave_one_out) == pytest.approx(layers[name]["leave_one_out_sqnr_db"], abs=0.005)
    assert re.search(r"SA score vs isolated sweep: Spearman -?\d\.\d\d over 3 layers", summary)

    report = project.path / ".eq-results/report.html"
    page = report.read_text()
    assert "most sensitive layers" in page
    # The bar plot is embedded in the self-contained page, once.
    sources = re.findall(r'<img src="([^"]+)"[^>]*data-role="sensitivity"', page)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")


def test_a_moved_layer_fails_with_its_row_and_tolerance(project: pytest.Pytester) -> None:
    args = (*TINY, "-k", "sensitivity and not plot")
    assert project.runpytest_inprocess(*args, "--eq-update-baselines").ret == 0
    path = project.path / TINY_DIR / "sensitivity.json"
    document = json.loads(path.read_text())
    row = document["values"]["layers"]["conv2"]
    row["isolated_sqnr_db"] += 0.3
    path.write_text(json.dumps(document))
    project.runpytest_inprocess(*args).assert_outcomes(passed=1, deselected=28)
    row["isolated_sqnr_db"] += 1.7
    path.write_text(json.dumps(document))
    result = project.runpytest_inprocess(*args)
    result.assert_outcomes(failed=1, deselected=28)
    assert re.search(
        rf"sensitivity\.layers\.conv2\.isolated_sqnr_db\s+{NUMBER}\s+{NUMBER}\s+-2\s+atol=0\.5 rtol=0 \(baseline\)",
        text(result),
    ), text(result)


def test_no_sensitivity_skips_the_check_and_its_plot(project: pytest.Pytester) -> None:
    ids = project.runpytest_inprocess(*TINY, "--collect-only", "-q", "--eq-no-sensitivity").outlines
    everything = project.runpytest_inprocess(*TINY, "--collect-only", "-q").outlines
    assert not [line for line in ids if "sensitivity" in line]
    assert [line for line in everything if "sensitivity" in line] == [
        "easyquant[tiny-none-w8a8]::sensitivity", "easyquant[tiny-none-w8a8]::plot[sensitivity]"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--eq-mixed-precision", "w4a8"), "--eq-mixed-precision expects LOW:HIGH recipes, e.g. w4a8:w8a8"),
        (("--eq-mixed-precision", "w4a8:w8a8:top1=2"), "top1 is a share in [0, 1], got 2"),
        (("--eq-mixed-precision", "w4a8:w8a8", "--eq-no-sensitivity"), "drop --eq-no-sensitivity"),
        (("--eq-mixed-precision", "w3a8:w8a8"), "--eq-model tiny: --eq-mixed-precision w3a8:w8a8: unknown recipe 'w3a8'"),
    ],
)
def test_bad_mixed_precision_is_one_usage_error(project: pytest.Pytester, args: tuple[str, ...], message: str) -> None:
    result = project.runpytest_inprocess(*TINY, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR:")]
    assert len(errors) == 1 and message in errors[0], result.errlines
    assert "Traceback" not in text(result)


def test_mixed_precision_adds_a_measured_suggestion(project: pytest.Pytester) -> None:
    result = project.runpytest_inprocess(
        *TINY, "-k", "sensitivity and not plot", "--eq-update-baselines", "--eq-mixed-precision", "w4a8:w8a8:sqnr=3"
    )
    assert result.ret == 0, text(result)
    line = re.search(
        rf"mixed precision w4a8:w8a8:sqnr=3: (\d) of 3 layers at w8a8 -> measured logits SQNR ({NUMBER}) dB, top-1 "
        rf"agreement \d\.\d+ \((meets|misses) the target: SQNR within 3 dB of all-w8a8; all w4a8 ({NUMBER}) dB, "
        rf"all w8a8 ({NUMBER}) dB\)\n\s+layers at w8a8: (.*)$",
        summary_of(result), re.MULTILINE,
    )
    assert line, summary_of(result)
    count, measured, verdict, low, high, layers = line.groups()
    assert verdict == "meets" and float(measured) >= float(high) - 3
    names = [] if layers == "none" else layers.split(", ")
    assert len(names) == int(count) and set(names) <= set(TINY_LAYERS)
    assert f"mixed precision w4a8:w8a8:sqnr=3: {count} of 3" in (project.path / ".eq-results/report.html").read_text()


@pytest.mark.slow
def test_digits_w4a4_against_w8a8_names_the_moved_sensitivity_rows(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "--eq-model", "digits", f"--eq-baseline-dir={REPO_BASELINES}",
        "--eq-recipe", "w4a4", "--eq-baseline-recipe", "w8a8", "-k", "sensitivity and not plot",
    )
    output = text(result)
    result.assert_outcomes(failed=1, deselected=55)
    for layer in ("conv1", "layer1.conv2", "fc"):
        for metric in ("isolated_sqnr_db", "leave_one_out_sqnr_db", "local_sqnr_db"):
            row = re.search(
                rf"sensitivity\.layers\.{re.escape(layer)}\.{metric}\s+({NUMBER})\s+({NUMBER})\s+(-\d+\.\d+)\s+"
                r"atol=0\.5 rtol=0 \(baseline\)", output,
            )
            assert row, (layer, metric, output)
            assert float(row.group(2)) < float(row.group(1)) - 5
    assert "recipe: baseline w8a8, now w4a4" in output


@pytest.mark.slow
def test_resnet18_mixed_precision_prints_a_layer_set_and_its_measured_sqnr(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "--eq-model", "resnet18", "--eq-calib-batches", "1", "--eq-update-baselines",
        "-k", "sensitivity and not plot", "--eq-mixed-precision", "w4a8:w8a8",
    )
    assert result.ret == 0, text(result)
    summary = summary_of(result)
    line = re.search(rf"mixed precision w4a8:w8a8: (\d+) of 21 layers at w8a8 -> measured logits SQNR ({NUMBER}) dB", summary)
    assert line, summary
    layers = re.search(r"^\s+layers at w8a8: (.+)$", summary, re.MULTILINE).group(1).split(", ")
    assert len(layers) == int(line.group(1)) and all(re.fullmatch(r"(conv1|fc|layer\d\.\d\.\S+)", n) for n in layers)
