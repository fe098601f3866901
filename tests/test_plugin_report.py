"""The session's reports as their readers meet them: the HTML dashboard in a real browser, the
JSON summary against its schema (merged from xdist workers), JUnit XML properties, unused
baselines (reported, failing on request, pruned) and the commands the plugin prints."""

from __future__ import annotations

import html
import json
import math
import re
import shlex
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from browser import chromium, probe, screenshot
from pytest_easyquant.report.charts import layer_chart
from pytest_easyquant.report.json_summary import SCHEMA
from pytest_easyquant.report.overview import layer_series
from pytest_easyquant.report.records import MetricRecord
from pytest_easyquant.storage import read_json
from test_plugin import CONFTEST, PLUGIN_MODELS, TINY, TINY_DIR, assert_no_internal_traceback, edit_json, one_torch_thread, project, run, text  # noqa: F401

pytest_plugins = ["pytester"]

PLOT = "plots/act-sa-activation_post_process_1.png"


def _files(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*") if p.is_file()}


def _darken(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        changed = image.convert("RGB")
    changed.paste((0, 0, 0), (10, 10, 80, 60))
    changed.save(path)


def _failing_tiny_session(project: pytest.Pytester, *extra: str) -> pytest.RunResult:
    """A tiny run whose fidelity, layer_sqnr and one plot moved since their baselines."""
    assert run(project, *TINY, "--eq-update-baselines").ret == 0
    directory = project.path / TINY_DIR
    edit_json(directory / "fidelity.json", lambda d: d["values"].update(sqnr_db=d["values"]["sqnr_db"] + 1))
    edit_json(directory / "layer_sqnr.json", lambda d: d["values"].update(conv2=d["values"]["conv2"] + 5))
    _darken(directory / PLOT)
    result = run(project, *TINY, "-p", "no:cacheprovider", *extra)
    result.assert_outcomes(passed=26, failed=3)
    return result


# --- the dashboard ----------------------------------------------------------------------------

PROBE = r"""
function shown(el) { return !!el && !el.closest('[hidden]') && getComputedStyle(el).display !== 'none' && el.getClientRects().length > 0; }
var out = {};
var headline = document.querySelector('section.run table.headline');
out.headlineShown = shown(headline);
out.headline = {};
headline.querySelectorAll('tr[data-metric]').forEach(function(tr){
  out.headline[tr.dataset.metric] = Array.prototype.map.call(tr.cells, function(td){ return td.textContent; });
});
out.chartPoints = document.querySelector('section.run svg.chart').querySelectorAll('circle > title').length;
out.chartShown = shown(document.querySelector('section.run svg.chart'));
var failures = document.querySelectorAll('details.check.failed');
out.failures = Array.prototype.map.call(failures, function(d){ return d.dataset.check; });
out.failuresBeforePassing = failures[0].compareDocumentPosition(document.querySelector('details.group.passing')) === Node.DOCUMENT_POSITION_FOLLOWING;
out.passingOpen = document.querySelector('details.group.passing').open;
var plot = document.querySelector('details.check.failed[data-check$="plot[act-sa-activation_post_process_1]"]');
out.images = Array.prototype.map.call(plot.querySelectorAll('.triptych figure'), function(f){
  var img = f.querySelector('img');
  return {label: f.querySelector('figcaption').textContent, complete: img.complete, width: img.naturalWidth,
          height: img.naturalHeight, shown: shown(img), src: img.getAttribute('src').slice(0, 22)};
});
var box = document.getElementById('filter');
function filter(text) {
  box.value = text; box.dispatchEvent(new Event('input'));
  var checks = {};
  document.querySelectorAll('details.check').forEach(function(d){ checks[d.dataset.check.split('::')[1]] = shown(d.querySelector('summary')); });
  var rows = {};
  document.querySelectorAll('details.check tr[data-metric]').forEach(function(tr){ rows[tr.dataset.metric] = shown(tr); });
  return {checks: checks, rows: rows};
}
out.byCheck = filter('layer_sqnr');
out.byMetric = filter('sqnr_db');
out.cleared = filter('');
window.eqProbe = out;
"""


def test_report_in_a_browser_shows_overview_failures_once_images_and_filters(project: pytest.Pytester) -> None:
    chromium()  # skips (fails under EQ_REQUIRE_BROWSER) before any work when there is none
    result = _failing_tiny_session(project)
    report = project.path / ".eq-results/report.html"
    page = report.read_text()
    # Self-contained: no file or URL is fetched to show it (the SVG namespace is a name, not a fetch).
    assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page and "url(" not in page
    for check in ("fidelity", "layer_sqnr", "plot[act-sa-activation_post_process_1]"):
        assert page.count(f'data-check="easyquant[tiny-none-w8a8]::{check}"') == 1, check

    seen = probe(report, PROBE, workdir=project.path)
    screenshot(report, project.path / "report.png")

    assert seen["headlineShown"]
    baseline, now, delta = (float(v) for v in seen["headline"]["fidelity.sqnr_db"][1:4])
    assert delta == pytest.approx(now - baseline, abs=1e-4) and delta == pytest.approx(-1.0, abs=1e-4)
    assert seen["headline"]["fidelity.sqnr_db"][-1] == "outside"
    assert seen["headline"]["accuracy.quantized.top1"][-1] == "ok"
    # The first chart, layer_sqnr of conv1, conv2 and fc: a baseline and a now point each.
    assert seen["chartShown"] and seen["chartPoints"] == 6
    assert sorted(c.split("::")[1] for c in seen["failures"]) == ["fidelity", "layer_sqnr", "plot[act-sa-activation_post_process_1]"]
    assert seen["failuresBeforePassing"] and not seen["passingOpen"]
    assert [i["label"] for i in seen["images"]] == ["baseline", "obtained", "difference"]
    for image in seen["images"]:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0 and image["shown"], image
        assert image["src"] == "data:image/png;base64,"

    checks, rows = seen["byCheck"]["checks"], seen["byCheck"]["rows"]
    assert checks["layer_sqnr"] and not checks["fidelity"] and not checks["plot[act-sa-activation_post_process_1]"]
    assert not checks["qparams[conv1.weight_fake_quant]"]
    assert rows["layer_sqnr.conv2"] and not rows["fidelity.sqnr_db"]
    # A metric name: its rows stay, the other rows of the same check go.
    checks, rows = seen["byMetric"]["checks"], seen["byMetric"]["rows"]
    assert checks["fidelity"] and rows["fidelity.sqnr_db"] and not rows["fidelity.kl_divergence"]
    assert not checks["layer_sqnr"] and not checks["plot[act-sa-activation_post_process_1]"]
    assert all(seen["cleared"]["checks"].values())
    assert_no_internal_traceback(result)


# --- JSON summary and JUnit XML ---------------------------------------------------------------


@pytest.mark.slow
def test_json_summary_merges_xdist_workers_validates_and_junit_carries_metrics(project: pytest.Pytester) -> None:
    models = ("--eq-model", "tiny", "--eq-model", "tiny2", "--eq-data", "data", "--eq-no-plots")
    assert run(project, *models, "--eq-update-baselines").ret == 0
    edit_json(project.path / TINY_DIR / "fidelity.json", lambda d: d["values"].update(sqnr_db=d["values"]["sqnr_db"] + 1))
    collected = run(project, *models, "--collect-only", "-q")
    ids = {line for line in collected.outlines if "::" in line}
    assert len(ids) == 40

    result = project.runpytest_subprocess(*models, "-n", "2", "--eq-json", "out.json", "--junitxml", "j.xml", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=39, failed=1)
    summary = json.loads((project.path / "out.json").read_text())
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(summary, SCHEMA, cls=jsonschema.Draft202012Validator)

    assert summary["exit_status"] == 1 and summary["counts"] == {"failed": 1, "passed": 39}
    checks = {c["nodeid"]: c for r in summary["runs"] for c in r["checks"]}
    assert set(checks) == ids
    assert {c["worker"] for c in checks.values()} == {"gw0", "gw1"}
    runs = {r["suite"]: r for r in summary["runs"]}
    assert runs["easyquant[tiny-none-w8a8]"]["configuration"]["model"] == "tiny"
    assert runs["easyquant[tiny2-none-w8a8]"]["layers"] == ["conv1", "conv2", "fc"]
    fidelity = checks["easyquant[tiny-none-w8a8]::fidelity"]
    assert fidelity["status"] == "failed"
    sqnr = next(m for m in fidelity["metrics"] if m["name"] == "fidelity.sqnr_db")
    assert not sqnr["pass"] and sqnr["delta"] == pytest.approx(-1.0)
    assert sqnr["tolerance"] == {"atol": 0.1, "rtol": 0.0, "source": "baseline"}
    recorded = read_json(project.path / TINY_DIR / "fidelity.json").values["sqnr_db"]
    assert sqnr["baseline"] == recorded

    cases = {f"{c.get('classname')}::{c.get('name')}": c for c in ET.parse(project.path / "j.xml").iter("testcase")}
    properties = {}
    for case in cases.values():
        if case.get("name") == "fidelity" and "tiny-none" in (case.get("classname") or ""):
            properties = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert properties["easyquant.status"] == "failed"
    assert float(properties["fidelity.sqnr_db.baseline"]) == pytest.approx(recorded)
    assert float(properties["fidelity.sqnr_db.delta"]) == pytest.approx(-1.0)
    assert float(properties["fidelity.sqnr_db"]) == pytest.approx(recorded - 1.0)


def test_json_numbers_json_cannot_carry_become_strings() -> None:
    from pytest_easyquant.report.json_summary import _metric

    row = MetricRecord("layer_sqnr.fc", math.inf, math.nan, None, "atol=0.1 rtol=0", False, "default", 0.1, 0.0)
    metric = _metric(row)
    assert metric["baseline"] == "Infinity" and metric["obtained"] == "NaN"
    json.dumps(metric, allow_nan=False)


# --- per-layer series: any check's per-layer rows ---------------------------------------------


def _row(metric: str, baseline: object, now: object, passed: bool = True) -> MetricRecord:
    return MetricRecord(metric, baseline, now, None, "atol=0 rtol=0", passed)


def test_layer_series_found_in_layer_paths_and_named_list_elements() -> None:
    layers = ["conv1", "layer1.conv1", "fc"]
    cumulative = [_row("layer_sqnr.fc", 30.0, 20.0, False), _row("layer_sqnr.layer1.conv1", 35.0, 34.0), _row("layer_sqnr.conv1", 40.0, 39.0)]
    (series,) = layer_series("layer_sqnr", cumulative, layers)
    assert series.name == "layer_sqnr" and [p.layer for p in series.points] == layers
    assert [(p.baseline, p.now, p.passed) for p in series.points] == [(40.0, 39.0, True), (35.0, 34.0, True), (30.0, 20.0, False)]

    # A sensitivity-like check: per layer under a key, and as list elements that carry their name.
    nested = [_row(f"sensitivity.layers.{name}.isolated_sqnr_db", 10.0 + i, 9.0) for i, name in enumerate(layers)]
    nested += [_row("sensitivity.weights_only_sqnr_db", 5.0, 4.0)]
    listed = [_row(f"sensitivity.rows.{i}.name", name, name) for i, name in enumerate(reversed(layers))]
    listed += [_row(f"sensitivity.rows.{i}.leave_one_out_sqnr_db", float(i), float(i)) for i in range(3)]
    found = {s.name: s for s in layer_series("sensitivity", nested + listed, layers)}
    assert set(found) == {"sensitivity.layers.isolated_sqnr_db", "sensitivity.rows.leave_one_out_sqnr_db"}
    assert [p.baseline for p in found["sensitivity.layers.isolated_sqnr_db"].points] == [10.0, 11.0, 12.0]
    # rows 0, 1, 2 are fc, layer1.conv1, conv1: network order puts them back.
    assert [p.baseline for p in found["sensitivity.rows.leave_one_out_sqnr_db"].points] == [2.0, 1.0, 0.0]
    # Per-target checks (one layer each) and single points are not charted.
    assert layer_series("weight_hist[conv1]", [_row("histogram.conv1.forward.zero_bin", 1.0, 1.0)] * 2, layers) == []
    assert layer_series("layer_sqnr", cumulative[:1], layers) == []


def test_layer_chart_draws_every_point_and_lists_non_finite_ones() -> None:
    layers = ["conv1", "conv2", "fc"]
    rows = [_row("layer_sqnr.conv1", 40.0, 39.0), _row("layer_sqnr.conv2", 35.0, math.inf, False), _row("layer_sqnr.fc", None, 20.0)]
    (series,) = layer_series("layer_sqnr", rows, layers)
    svg = layer_chart(series)
    assert svg.count("<circle") == 4 + 1  # baseline conv1, conv2; now conv1, fc; plus the legend's dot
    assert "not drawn (not finite): conv2" in svg
    assert re.search(r"<title>fc: baseline -, now 20, delta -</title>", svg)


# --- unused baselines ---------------------------------------------------------------------------


def test_prune_unused_deletes_exactly_the_removed_models_files(project: pytest.Pytester) -> None:
    project.makeini("[pytest]\neq_model =\n    tiny\n    tiny2\neq_data = data\neq_no_plots = true\n")
    assert run(project, "--eq-update-baselines").ret == 0
    root = project.path / "baselines"
    kept, removed = _files(root / "tiny-none"), _files(root / "tiny2-none")
    assert len(kept) == len(removed) == 28  # 38 less the 9 plots and their metadata.json

    # tiny2 leaves the project's model list: its files are unused.
    project.makeini("[pytest]\neq_model = tiny\neq_data = data\neq_no_plots = true\n")
    reported = run(project, "-p", "no:cacheprovider")
    assert reported.ret == 0
    assert f"unused baselines ({len(removed)}), not checked by any generated test:" in text(reported)
    failing = run(project, "-p", "no:cacheprovider", "--eq-fail-unused")
    assert failing.ret == pytest.ExitCode.TESTS_FAILED
    failing.assert_outcomes(passed=20)
    command = re.search(r"delete them with: (pytest .*)$", text(failing), re.MULTILINE).group(1)
    # A selection (-k, or models named on the command line) says nothing about other models.
    assert "unused baselines" not in text(run(project, "-p", "no:cacheprovider", "-k", "fidelity"))
    assert "unused baselines" not in text(run(project, "-p", "no:cacheprovider", "--eq-model", "tiny"))

    pruned = run(project, *shlex.split(command)[1:])
    assert pruned.ret == 0, text(pruned)
    assert f"deleted {len(removed)} unused baselines (--eq-prune-unused):" in text(pruned)
    assert _files(root) == kept and not (root / "tiny2-none").exists()
    again = run(project, "-p", "no:cacheprovider", "--eq-fail-unused")
    assert again.ret == 0 and "unused baselines" not in text(again)


def test_prune_respects_the_selection_and_no_plots_uses_no_baselines(project: pytest.Pytester) -> None:
    models = ("--eq-model", "tiny", "--eq-model", "tiny2", "--eq-data", "data")
    assert run(project, *models, "--eq-update-baselines").ret == 0
    # --eq-no-plots skips the plot checks: their baselines are not unused.
    no_plots = run(project, *models, "--eq-no-plots", "--eq-fail-unused", "-p", "no:cacheprovider")
    assert no_plots.ret == 0 and "unused baselines" not in text(no_plots)

    stale = {project.path / f"baselines/{m}-none/w8a8/qparams/renamed.weight_fake_quant.json" for m in ("tiny", "tiny2")}
    for path in stale:
        shutil.copy(path.parent / "conv1.weight_fake_quant.json", path)
    before = _files(project.path / "baselines")
    # -k selects tiny's checks only: tiny2's directory is not searched, so its stray file stays.
    pruned = run(project, *models, "-k", "tiny-none and qparams", "--eq-prune-unused", "-p", "no:cacheprovider")
    assert pruned.ret == 0, text(pruned)
    tiny_stale = next(p for p in stale if "/tiny-none/" in str(p))
    assert _files(project.path / "baselines") == before - {tiny_stale}


# --- commands, metadata ------------------------------------------------------------------------


def test_repair_command_of_a_compared_recipe_rerecords_that_recipe(project: pytest.Pytester) -> None:
    args = (*TINY, "--eq-no-plots", "-k", "fidelity", "-p", "no:cacheprovider")
    assert run(project, *args, "--eq-update-baselines").ret == 0
    w8a8 = project.path / TINY_DIR / "fidelity.json"
    w8a8.write_text("{ not json")
    broken = run(project, *args, "--eq-recipe", "w4a4", "--eq-baseline-recipe", "w8a8")
    broken.assert_outcomes(failed=1, deselected=19)
    command = re.search(r"re-record it with: (pytest .*)$", text(broken), re.MULTILINE).group(1)
    assert "--eq-recipe w8a8" in command and "--eq-baseline-recipe" not in command
    assert run(project, *shlex.split(command)[1:]).ret == 0
    assert read_json(w8a8).metadata.recipe["name"] == "w8a8"
    run(project, *args).assert_outcomes(passed=1, deselected=19)


def test_metadata_records_the_environment_and_an_image_failure_names_a_freetype_and_cpu_change(project: pytest.Pytester) -> None:
    import matplotlib
    from matplotlib import ft2font

    from pytest_easyquant import cpu_kernels

    args = (*TINY, "-k", "act-sa-activation_post_process_1", "-p", "no:cacheprovider")
    assert run(project, *args, "--eq-update-baselines").ret == 0
    directory = project.path / TINY_DIR
    metadata = read_json(directory / "metadata.json").metadata
    assert metadata.freetype == ft2font.__freetype_version__ and metadata.backend == "fx"
    assert metadata.python.count(".") == 2 and metadata.platform.startswith(("Linux", "Darwin", "Windows"))

    assert metadata.cpu == cpu_kernels.describe()

    edit_json(directory / "metadata.json", lambda d: d["metadata"].update(freetype="2.6.1", cpu="AVX512_BF16"))
    _darken(directory / PLOT)
    result = run(project, *args)
    result.assert_outcomes(failed=1, deselected=28)
    output = text(result)
    assert f"freetype: baseline 2.6.1, now {ft2font.__freetype_version__}" in output
    assert f"the baseline was recorded on other CPU kernels (AVX512_BF16; now {cpu_kernels.describe()})" in output
    assert re.search(
        rf"the baseline image was drawn with FreeType 2\.6\.1 \(now {re.escape(ft2font.__freetype_version__)}\): "
        r"text and antialiasing differ .*: pytest .*--eq-update-baselines$", output, re.MULTILINE
    ), output
    assert f"matplotlib {matplotlib.__version__}" not in output.split("drawn with", 1)[1].splitlines()[0]


def test_a_failed_model_run_is_reported_once_and_missing_rows_say_so() -> None:
    from pytest_easyquant.report.html import render_page
    from pytest_easyquant.report.overview import build_overviews
    from pytest_easyquant.session import Outcome

    error = "running model 'nannet' failed: activation_post_process_3 produced 32 NaN and 0 inf values"
    outcomes = [Outcome(f"easyquant[nannet-none-w8a8]::{c}", "easyquant[nannet-none-w8a8]", c, "error", message=error) for c in ("fidelity", "layer_sqnr")]
    missing_row = MetricRecord("fidelity.sqnr_db", None, 51.7, None, "atol=0.1 rtol=0", True)
    outcomes.append(Outcome("easyquant[tiny-none-w8a8]::fidelity", "easyquant[tiny-none-w8a8]", "fidelity", "missing",
                            rows=[missing_row], message="no baseline at baselines/tiny-none/w8a8/fidelity.json (the easyquant summary has the command that records it)",
                            command="pytest -m easyquant --eq-model tiny --eq-update-new-only"))
    page = render_page(build_overviews(outcomes, {}))
    assert page.count(html.escape(error)) == 1 and page.count("the model run failed (above)") == 2
    assert page.count("pytest -m easyquant --eq-model tiny --eq-update-new-only") == 1
    assert re.search(r'data-metric="fidelity\.sqnr_db">.*?<td>-</td><td>51\.7</td><td>-</td>.*?<td>no baseline</td>', page)
