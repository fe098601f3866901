"""The shared comparison routine: tolerances and their precedence, value/array/histogram/image
rows, and the failure report."""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from pytest_easyquant.check_report import CheckReport, Row
from pytest_easyquant.compare import compare_array, compare_values, histogram_distance
from pytest_easyquant.errors import CheckFailure, run_check
from pytest_easyquant.image_compare import compare_image
from pytest_easyquant.tolerances import DEFAULT_RULES, Tolerance, ToleranceRule, ToleranceTable, parse_rule

EXACT = ToleranceTable([ToleranceRule("*", Tolerance(), "default")])


# --- Tolerance -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tolerance, baseline, obtained, allowed",
    [
        (Tolerance(), 1.0, 1.0, True),
        (Tolerance(), 1.0, 1.0 + 1e-15, False),
        (Tolerance(atol=0.1), 1.0, 1.1, True),
        (Tolerance(atol=0.1), 1.0, 1.1000001, False),
        (Tolerance(atol=0.1), 1.0, 0.9, True),
        (Tolerance(rtol=0.1), 10.0, 11.0, True),
        (Tolerance(rtol=0.1), 10.0, 11.01, False),
        (Tolerance(rtol=0.1), -10.0, -11.0, True),
        (Tolerance(atol=1.0, rtol=0.1), 10.0, 12.0, True),
        (Tolerance(atol=1.0, rtol=0.1), 10.0, 12.01, False),
        (Tolerance(), math.nan, math.nan, True),
        (Tolerance(atol=1e9), math.nan, 1.0, False),
        (Tolerance(atol=1e9), 1.0, math.nan, False),
        (Tolerance(), math.inf, math.inf, True),
        (Tolerance(), -math.inf, -math.inf, True),
        (Tolerance(atol=1e9, rtol=1.0), math.inf, 5.0, False),
        (Tolerance(atol=1e9, rtol=1.0), 5.0, math.inf, False),
        (Tolerance(atol=math.inf), math.inf, -math.inf, False),
        (Tolerance(atol=math.inf), 1.0, 1e300, True),
        (Tolerance(), 3, 3.0, True),
    ],
)
def test_tolerance_allows(tolerance: Tolerance, baseline: float, obtained: float, allowed: bool) -> None:
    assert tolerance.allows(baseline, obtained) is allowed


def test_tolerance_validation_and_description() -> None:
    assert Tolerance(atol=0.01).describe() == "atol=0.01 rtol=0"
    assert Tolerance(atol=1e-8, rtol=1e-4).describe() == "atol=1e-08 rtol=0.0001"
    for bad in ({"atol": -1.0}, {"rtol": math.nan}, {"atol": "1"}, {"atol": True}):
        with pytest.raises(ValueError):
            Tolerance(**bad)  # type: ignore[arg-type]


# --- rules and precedence ----------------------------------------------------------------------


def test_parse_rule() -> None:
    rule = parse_rule("fidelity.* atol=0.1 rtol=0.01", source="cli")
    assert rule == ToleranceRule("fidelity.*", Tolerance(atol=0.1, rtol=0.01), "cli")
    assert parse_rule("  image.*   atol=2 ", source="ini").tolerance == Tolerance(atol=2.0)
    assert parse_rule("sa.*.score rtol=5e-2", source="marker").tolerance == Tolerance(rtol=0.05)
    assert parse_rule("layer_sqnr.fc atol=inf", source="marker").tolerance.atol == math.inf


@pytest.mark.parametrize(
    "text",
    ["", "fidelity.*", "atol=0.1", "fidelity.* atol", "fidelity.* atol=x", "fidelity.* atol=0.1 atol=0.2",
     "fidelity.* tol=0.1", "fidelity.* atol=-1", "fidelity.* atol=nan", "fidelity.* 0.1", "a b atol=1"],
)
def test_parse_rule_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rule(text, source="cli")
    message = str(info.value)
    assert repr(text) in message and "<metric-glob> atol=<number> [rtol=<number>]" in message


def test_rule_source_must_be_known() -> None:
    with pytest.raises(ValueError, match="source"):
        parse_rule("x atol=1", source="env")


def test_precedence_marker_cli_ini_baseline_default() -> None:
    layers = ["marker", "cli", "ini", "baseline", "default"]
    rules = [ToleranceRule("fidelity.*", Tolerance(atol=float(i + 1)), source) for i, source in enumerate(layers)]
    for start in range(len(layers)):
        table = ToleranceTable(reversed(rules[start:]))  # order of the input list does not matter across layers
        assert table.resolve("fidelity.sqnr_db") == (Tolerance(atol=float(start + 1)), layers[start])


def test_higher_layer_only_wins_where_it_matches() -> None:
    table = ToleranceTable([*DEFAULT_RULES, parse_rule("fidelity.kl_divergence atol=1", source="marker")])
    assert table.resolve("fidelity.kl_divergence") == (Tolerance(atol=1.0), "marker")
    assert table.resolve("fidelity.sqnr_db") == (Tolerance(atol=0.1), "default")


def test_later_rule_wins_within_a_layer() -> None:
    table = ToleranceTable(
        [parse_rule("fidelity.* atol=1", source="ini"), parse_rule("fidelity.sqnr_db atol=2", source="ini"),
         parse_rule("fidelity.* atol=3", source="ini")]
    )
    assert table.resolve("fidelity.sqnr_db") == (Tolerance(atol=3.0), "ini")
    table = ToleranceTable([parse_rule("fidelity.* atol=1", source="ini"), parse_rule("fidelity.sqnr_db atol=2", source="ini")])
    assert table.resolve("fidelity.sqnr_db") == (Tolerance(atol=2.0), "ini")
    assert table.resolve("fidelity.cosine_similarity") == (Tolerance(atol=1.0), "ini")


def test_nothing_matching_is_exact() -> None:
    assert ToleranceTable([]).resolve("x") == (Tolerance(), "default")


@pytest.mark.parametrize(
    "metric, expected",
    [
        ("accuracy.quantized.top1", Tolerance(atol=0.01)),
        ("fidelity.sqnr_db", Tolerance(atol=0.1)),
        ("fidelity.top1_agreement", Tolerance(atol=0.01)),
        ("fidelity.kl_divergence", Tolerance(atol=1e-4, rtol=0.05)),
        ("fidelity.cosine_similarity", Tolerance(atol=1e-4)),
        ("layer_sqnr.layer1.0.conv1", Tolerance(atol=0.1)),
        ("qparams.layer1.0.conv1.weight_fake_quant.scale", Tolerance(atol=1e-8, rtol=1e-4)),
        ("histogram.layer1.0.relu.forward.distance", Tolerance(atol=0.01)),
        ("histogram.layer1.0.relu.forward.clamped_above", Tolerance(atol=1e-3, rtol=1e-3)),
        ("histogram.layer1.0.relu.score", Tolerance(atol=1e-12, rtol=0.05)),
        ("sa.layer1.score", Tolerance(atol=1e-12, rtol=0.05)),
        ("image.act-sa-layer1", Tolerance(atol=1.0)),
        ("something.else", Tolerance(atol=1e-6, rtol=1e-6)),
    ],
)
def test_default_rules(metric: str, expected: Tolerance) -> None:
    assert ToleranceTable(DEFAULT_RULES).resolve(metric) == (expected, "default")


# --- values ---------------------------------------------------------------------------------


def by_metric(rows: list[Row]) -> dict[str, Row]:
    return {row.metric: row for row in rows}


def test_compare_values_nested_new_and_missing() -> None:
    table = ToleranceTable([*DEFAULT_RULES, parse_rule("fidelity.* atol=0.5", source="cli")])
    baseline = {
        "sqnr_db": 30.0,
        "block": {"top1": 0.9, "deep": {"x": 1}},
        "name": "w8a8",
        "flag": True,
        "none": None,
        "gone": {"a": 1.0, "b": 2.0},
        "scales": [0.1, 0.2],
        "labels": ["a", "b"],
        "nested_list": [{"v": 1.0}, {"v": 2.0}],
    }
    obtained = {
        "sqnr_db": 29.6,
        "block": {"top1": 0.9, "deep": {"x": 2}},
        "name": "w4a4",
        "flag": True,
        "none": None,
        "new": 3.5,
        "scales": [0.1, 0.2],
        "labels": ["a", "c"],
        "nested_list": [{"v": 1.0}, {"v": 2.6}],
    }
    rows = by_metric(compare_values("fidelity", baseline, obtained, table))
    assert sorted(rows) == sorted(
        ["fidelity.sqnr_db", "fidelity.block.top1", "fidelity.block.deep.x", "fidelity.name", "fidelity.flag", "fidelity.none",
         "fidelity.gone.a", "fidelity.gone.b", "fidelity.new", "fidelity.scales", "fidelity.labels.0", "fidelity.labels.1",
         "fidelity.nested_list.0.v", "fidelity.nested_list.1.v"]
    )
    sqnr = rows["fidelity.sqnr_db"]
    assert sqnr.passed and sqnr.tolerance_source == "cli" and sqnr.delta == pytest.approx(-0.4)
    assert not rows["fidelity.block.deep.x"].passed and rows["fidelity.block.deep.x"].delta == 1
    assert not rows["fidelity.name"].passed and rows["fidelity.name"].delta is None
    assert rows["fidelity.flag"].passed and rows["fidelity.none"].passed
    assert rows["fidelity.gone.a"].note == "missing now" and not rows["fidelity.gone.a"].passed
    assert rows["fidelity.gone.a"].baseline == 1.0 and rows["fidelity.gone.a"].obtained is None
    assert rows["fidelity.new"].note == "not in baseline (new metric)" and not rows["fidelity.new"].passed
    assert rows["fidelity.scales"].passed
    assert rows["fidelity.labels.0"].passed and not rows["fidelity.labels.1"].passed
    assert rows["fidelity.nested_list.0.v"].passed and not rows["fidelity.nested_list.1.v"].passed


def test_compare_values_type_and_length_changes() -> None:
    rows = by_metric(
        compare_values("x", {"a": 1.0, "b": [1, 2], "c": "1", "d": True, "e": {"k": 1}}, {"a": "1.0", "b": [1, 2, 3], "c": 1, "d": 1, "e": 1}, EXACT)
    )
    assert not any(row.passed for row in rows.values())
    assert rows["x.a"].note == "type changed: baseline float, now str"
    assert rows["x.b"].note.startswith("shape differs: baseline (2,), now (3,)")
    assert rows["x.d"].note == "type changed: baseline bool, now int"
    assert rows["x.e"].note == "type changed: baseline object, now int"


def test_compare_values_nan_and_identity() -> None:
    values = {"a": math.nan, "b": [math.nan, 1.0], "c": math.inf}
    rows = compare_values("", values, {"a": math.nan, "b": [math.nan, 1.0], "c": math.inf}, EXACT)
    assert [row.metric for row in rows] == ["a", "b", "c"] and all(row.passed for row in rows)
    assert not compare_values("", {"a": math.nan}, {"a": 0.0}, ToleranceTable(DEFAULT_RULES))[0].passed


# --- arrays ---------------------------------------------------------------------------------


def test_compare_array_report_numbers() -> None:
    baseline = 1.0 + np.arange(512) * 0.01
    obtained = baseline.copy()
    obtained[17] += 0.0012
    obtained[100] -= 0.0005
    obtained[300] += 0.0008
    row = compare_array("qparams.x.scale", baseline, obtained, Tolerance(atol=1e-4), "default")
    assert not row.passed
    first = row.note.splitlines()[0]
    # 3 of 512 differ; max abs 0.0012 at 17; max rel 0.0012 / 1.17; mean abs (0.0012 + 0.0005 + 0.0008) / 512
    assert first == (
        f"3 of 512 elements (0.59%) differ; max abs error 0.0012 at index (17,); "
        f"max rel error {0.0012 / 1.17:.6g}; mean abs error {0.0025 / 512:.6g}"
    )
    assert "mean abs error 4.88281e-06" in first
    listing = row.note.splitlines()[1:]
    assert listing == [
        "at (17,): baseline 1.17, obtained 1.1712",
        "at (100,): baseline 2, obtained 1.9995",
        "at (300,): baseline 4, obtained 4.0008",
    ]
    assert row.baseline == "float64[512]" and row.delta is None
    assert compare_array("m", baseline, obtained, Tolerance(atol=0.0013), "cli").passed
    assert compare_array("m", np.array([1.0, 10.0]), np.array([1.1, 11.0]), Tolerance(atol=0.1, rtol=0.09), "cli").passed
    assert compare_array("m", baseline, obtained, Tolerance(rtol=0.0011), "cli").passed


def test_compare_array_2d_index_and_listing_limit() -> None:
    baseline = np.zeros((4, 5), dtype=np.float32)
    obtained = baseline.copy()
    obtained[1, 2] = 0.5
    obtained[3, :] = 0.25
    row = compare_array("m", baseline, obtained, Tolerance(), "default")
    lines = row.note.splitlines()
    assert lines[0] == "6 of 20 elements (30.00%) differ; max abs error 0.5 at index (1, 2); max rel error inf; mean abs error 0.0875"
    assert lines[1] == "at (1, 2): baseline 0, obtained 0.5"
    assert lines[-1] == "... and 1 more"
    assert row.baseline == "float32[4, 5]"


def test_compare_array_shape_and_nonfinite() -> None:
    row = compare_array("m", np.zeros(3), np.zeros((3, 1)), Tolerance(atol=1.0), "ini")
    assert not row.passed and row.note == "shape differs: baseline (3,), now (3, 1)"
    row = compare_array(
        "m", np.array([np.nan, 1.0, np.inf, 2.0]), np.array([np.nan, np.nan, np.inf, 5.0]), Tolerance(atol=0.1), "cli"
    )
    first = row.note.splitlines()[0]
    assert first == "2 of 4 elements (50.00%) differ; max abs error 3 at index (3,); max rel error 1.5; mean abs error 3; 1 NaN/inf mismatches"
    assert compare_array("m", np.array([np.nan, np.inf]), np.array([np.nan, np.inf]), Tolerance(), "x").passed


def test_compare_array_small_summaries_and_ints() -> None:
    row = compare_array("qparams.zp", np.array([0, 3]), np.array([0, 4]), Tolerance(atol=1e-8), "default")
    assert row.baseline == "[0, 3]" and row.obtained == "[0, 4]"
    assert row.note.splitlines()[1] == "at (1,): baseline 3, obtained 4"


def test_compare_array_strings() -> None:
    row = compare_array("m", np.array(["a", "b"]), np.array(["a", "c"]), Tolerance(), "default")
    assert not row.passed and row.note == "at (1,): baseline 'b', obtained 'c'"


# --- histograms ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "baseline, obtained, distance",
    [
        ([1, 0], [0, 1], 1.0),
        ([1, 1], [2, 2], 0.0),
        ([1, 3], [3, 1], 0.5),
        ([0, 0, 0], [0, 0, 0], 0.0),
        ([0, 0], [0, 5], 1.0),
        ([5, 0], [0, 0], 1.0),
        ([2, 1, 1], [1, 1, 2], 0.25),
        ([], [], 0.0),
    ],
)
def test_histogram_distance(baseline: list[float], obtained: list[float], distance: float) -> None:
    assert histogram_distance(np.array(baseline), np.array(obtained)) == pytest.approx(distance, abs=1e-15)


def test_histogram_distance_errors() -> None:
    with pytest.raises(ValueError, match="different bins"):
        histogram_distance([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=">= 0"):
        histogram_distance([1, -2], [1, 2])
    assert math.isnan(histogram_distance([1, math.nan], [1, 2]))


# --- images ---------------------------------------------------------------------------------


def render(y: list[float], size: tuple[float, float] = (2.0, 1.5)) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=50)
    ax.plot(range(len(y)), y)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def rms(a: bytes, b: bytes) -> float:
    from PIL import Image

    x = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=float)
    y = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=float)
    return float(np.sqrt(((x - y) ** 2).mean()))


def test_identical_images_pass_and_leave_nothing(tmp_path: Path) -> None:
    png = render([0, 1, 0])
    row = compare_image("image.act-sa-x", png, render([0, 1, 0]), Tolerance(atol=0.0), "default", results_dir=tmp_path)
    assert row.passed and row.obtained == 0.0 and row.artifacts == ()
    assert list(tmp_path.iterdir()) == []


def test_changed_image_fails_and_keeps_files(tmp_path: Path) -> None:
    before, after = render([0, 1, 0]), render([0, 1, 2])
    row = compare_image("image.weight-sa-fc", before, after, Tolerance(atol=1.0), "default", results_dir=tmp_path)
    assert not row.passed
    assert row.obtained == pytest.approx(rms(before, after), rel=1e-6) and row.obtained > 1.0
    folder = tmp_path / "image.weight-sa-fc"
    assert sorted(p.name for p in folder.iterdir()) == ["baseline.png", "diff.png", "result.png"]
    assert (folder / "baseline.png").read_bytes() == before and (folder / "result.png").read_bytes() == after
    assert row.artifacts == tuple(str(folder / name) for name in ("baseline.png", "result.png", "diff.png"))
    assert all(path in row.note for path in row.artifacts)
    assert row.note.startswith(f"RMS pixel difference {row.obtained:.4g} (0-255 scale) > 1")
    # within a looser tolerance it passes and the folder goes away
    loose = compare_image("image.weight-sa-fc", before, after, Tolerance(atol=row.obtained + 0.01), "marker", results_dir=tmp_path)
    assert loose.passed and loose.obtained == pytest.approx(row.obtained) and not folder.exists()


def test_image_size_change_fails_with_both_sizes(tmp_path: Path) -> None:
    row = compare_image("image.p", render([0, 1]), render([0, 1], size=(3.0, 1.5)), Tolerance(atol=50.0), "default", results_dir=tmp_path)
    assert not row.passed
    assert row.note.splitlines()[0] == "image size differs: baseline 100x75, now 150x75"
    assert (row.baseline, row.obtained) == ("100x75", "150x75")
    assert sorted(Path(p).name for p in row.artifacts) == ["baseline.png", "result.png"]


def test_image_not_png_fails(tmp_path: Path) -> None:
    row = compare_image("image.p", b"nope", render([0, 1]), Tolerance(atol=1.0), "default", results_dir=tmp_path)
    assert not row.passed and "baseline image is not a PNG" in row.note


# --- report and the check routine -----------------------------------------------------------------


def sample_report() -> CheckReport:
    rows = [
        Row("fidelity.sqnr_db", 31.2456, 29.8812, Tolerance(atol=0.1), "cli", False),
        Row("fidelity.cosine_similarity", 0.1234567, 0.1234568, Tolerance(atol=1e-4), "default", True),
        Row("fidelity.kl_divergence", 0.1234567, 0.1234568, Tolerance(), "marker", False),
        compare_array("qparams.x.scale", np.array([1.0, 2.0, 4.0, 8.0]), np.array([1.0, 2.5, 4.0, 8.0]), Tolerance(rtol=1e-4), "default"),
        Row("fidelity.name", "w8a8", "w4a4", Tolerance(), "default", False, "not in baseline (new metric)"),
    ]
    return CheckReport(
        name="easyquant[resnet18-none-w8a8]::fidelity",
        rows=rows,
        metadata_differences=["torch: baseline 2.14.1, now 2.15.0", "recipe: baseline w8a8, now w4a4"],
        extra=["see the HTML report"],
    )


def test_report_format_shows_failures_table_notes_and_metadata() -> None:
    report = sample_report()
    assert not report.passed and len(report.failed_rows) == 4
    text = report.format()
    lines = text.splitlines()
    assert lines[0] == "easyquant[resnet18-none-w8a8]::fidelity: 4 of 5 metrics outside tolerance"
    assert lines[1].split() == ["metric", "baseline", "obtained", "delta", "tolerance"]
    header = lines[1]
    sqnr = next(line for line in lines if "fidelity.sqnr_db" in line)
    assert sqnr.split() == ["fidelity.sqnr_db", "31.2456", "29.8812", "-1.3644", "atol=0.1", "rtol=0", "(cli)"]
    for column in ("baseline", "obtained", "delta", "tolerance"):  # aligned columns
        assert all(line[header.index(column) - 1] == " " for line in lines[3:7])
    kl = next(line for line in lines if "fidelity.kl_divergence" in line)
    assert "0.1234567" in kl and "0.1234568" in kl  # enough digits to see the change
    assert "fidelity.cosine_similarity" not in text
    assert "  qparams.x.scale: 1 of 4 elements (25.00%) differ; max abs error 0.5 at index (1,)" in text
    assert "    at (1,): baseline 2, obtained 2.5" in text
    assert "'w8a8'" in text and "fidelity.name: not in baseline (new metric)" in text
    scale = next(line for line in lines if line.lstrip().startswith("qparams.x.scale "))
    assert scale.split()[:3] == ["qparams.x.scale", "float64[4]", "float64[4]"]  # summaries unquoted
    tail = lines[lines.index("baseline was recorded with:") :]
    assert tail == ["baseline was recorded with:", "  torch: baseline 2.14.1, now 2.15.0", "  recipe: baseline w8a8, now w4a4", "see the HTML report"]
    everything = report.format(only_failures=False)
    assert "fidelity.cosine_similarity" in everything and "FAILED" in everything


def test_run_check_raises_check_failure_with_the_report() -> None:
    run_check(CheckReport(name="ok", rows=[Row("a", 1.0, 1.0, Tolerance(), "default", True)]))
    run_check(CheckReport(name="empty", rows=[]))
    report = sample_report()
    with pytest.raises(CheckFailure) as info:
        run_check(report)
    assert isinstance(info.value, AssertionError)
    assert info.value.report is report and str(info.value) == report.format()
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value)


def test_row_delta() -> None:
    assert Row("a", 1, 3, Tolerance(), "default", False).delta == 2
    assert Row("a", np.float32(1.5), 2.0, Tolerance(), "default", False).delta == 0.5
    assert Row("a", True, False, Tolerance(), "default", False).delta is None
    assert Row("a", None, 1.0, Tolerance(), "default", False).delta is None
    assert Row("a", "x", "y", Tolerance(), "default", False).delta is None
