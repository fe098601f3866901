"""The pytest plugin end to end: real pytest sessions (pytester) running generated suites and users'
tests, proving the plugin issue's acceptance criteria.

Most sessions run in-process on the tiny models of ``plugin_models.py`` (copied into each pytester
directory, registered by a one-line conftest) with an ImageFolder of eight random 16x16 PNGs; a
whole suite takes about a second. Real models (resnet18, digits against the committed baselines,
and the kill test) are marked ``slow``. Sessions that must start a fresh interpreter (xdist, the
warnings check, the kill test) run as subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import torch

# Imported once here: pytester's in-process sessions drop the modules they import, so modules
# first imported inside them (matplotlib above all) would be imported again in every session.
import eqcore.plots.api  # noqa: F401
import matplotlib.testing.compare  # noqa: F401
import pytest_easyquant.pipeline  # noqa: F401
import pytest_easyquant.plotting  # noqa: F401
import pytest_easyquant.reporting  # noqa: F401
from plugin_models import NaNNet, Tiny, make_image_folder
from pytest_easyquant import cpu_kernels
from pytest_easyquant.errors import BaselineError
from pytest_easyquant.image_compare import compare_image
from pytest_easyquant.storage import read_json, read_npz, read_png
from pytest_easyquant.tolerances import Tolerance

pytest_plugins = ["pytester"]

REPO_BASELINES = Path(__file__).resolve().parents[1] / "baselines"
PLUGIN_MODELS = Path(__file__).with_name("plugin_models.py")
CONFTEST = "from plugin_models import pytest_easyquant_register  # noqa: F401\n"
TINY = ("--eq-model", "tiny", "--eq-data", "data")
TINY_DIR = Path("baselines/tiny-none/w8a8")
HEADER = re.compile(r"metric\s+baseline\s+now\s+delta\s+tolerance")


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One intra-op thread in-process and in subprocesses: on shared, loaded cores two OpenMP
    threads spinning against other work turn a 2-second digits session into a 30-second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester directory with the tiny models registered and an ImageFolder ``data``."""
    shutil.copy(PLUGIN_MODELS, pytester.path / "plugin_models.py")
    pytester.makeconftest(CONFTEST)
    make_image_folder(pytester.path / "data")
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess(*args)


def text(result: pytest.RunResult) -> str:
    return "\n".join(result.outlines + result.errlines)


def assert_no_internal_traceback(result: pytest.RunResult) -> None:
    output = text(result)
    assert "Traceback" not in output, output
    assert "pytest_easyquant/" not in output, output
    assert "eqcore/" not in output, output
    assert "During handling of the above exception" not in output, output


def read_back(path: Path) -> object:
    """The stored content through the plugin's own readers (raises BaselineError if unusable)."""
    reader = {".json": read_json, ".npz": read_npz, ".png": read_png}[path.suffix]
    return reader(path)


def baseline_files(directory: Path) -> dict[Path, bytes]:
    return {
        p.relative_to(directory): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.suffix in (".json", ".npz", ".png")
    }


def temp_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob(".*.tmp"))


def collected_ids(pytester: pytest.Pytester, *args: str) -> list[str]:
    result = run(pytester, *args, "--collect-only", "-q")
    assert result.ret == 0, text(result)
    return [line for line in result.outlines if "::" in line]


def expected_layout(ids: Iterable[str]) -> set[Path]:
    """The files a generated suite stores, from its node ids, per the documented layout."""
    folders = {"act_hist": "histograms/activations", "weight_hist": "histograms/weights"}
    files: set[Path] = set()
    for nodeid in ids:
        check = nodeid.split("::", 1)[1]
        kind, _, target = check.partition("[")
        target = target.rstrip("]")
        if kind in ("accuracy", "fidelity", "layer_sqnr", "sensitivity"):
            files.add(Path(f"{kind}.json"))
        elif kind == "qparams":
            files.add(Path(f"qparams/{target}.json"))
        elif kind in ("act_hist", "weight_hist"):
            files |= {Path(f"{folders[kind]}/{target}{suffix}") for suffix in (".json", ".npz")}
        elif kind == "plot":
            files |= {Path(f"plots/{target}.png"), Path("metadata.json")}
        else:
            raise AssertionError(f"unexpected check {check!r}")
    return files


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document, indent=2, sort_keys=True))


# --- real models against the committed baselines ---------------------------------------------


def passed_ids(result: pytest.RunResult) -> list[str]:
    return re.findall(r"^(easyquant\[\S+) PASSED", "\n".join(result.outlines), re.MULTILINE)


@pytest.mark.slow
def test_resnet18_passes_offline_in_an_empty_directory(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-hub"))  # nothing cached, nothing fetched
    # The committed baselines were recorded on pinned kernels, which a fresh process can still take.
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-v", "--eq-pin-kernels", "--eq-model", "resnet18", f"--eq-baseline-dir={REPO_BASELINES}"
    )
    assert result.ret == 0, text(result)
    ids = passed_ids(result)
    result.assert_outcomes(passed=len(ids))
    # Every committed file was checked, and nothing else.
    assert expected_layout(ids) == set(baseline_files(REPO_BASELINES / "resnet18-none/w8a8"))
    assert "unused baselines" not in text(result)
    assert not (tmp_path / "no-torch-hub").exists()


def _without_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in cpu_kernels.PINS:
        monkeypatch.delenv(name, raising=False)


def test_pin_kernels_records_avx2_kernels_and_compares_on_them(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512", "AVX512_BF16", "AVX512_VNNI", "AMX"):
        pytest.skip("--eq-pin-kernels needs an x86-64 CPU with AVX2")
    _without_pins(monkeypatch)
    args = ("-p", "no:cacheprovider", *TINY, "--eq-pin-kernels", "--eq-no-plots", "--eq-no-sensitivity")
    recorded = project.runpytest_subprocess(*args, "--eq-update-baselines")
    assert recorded.ret == 0, text(recorded)
    assert read_json(project.path / TINY_DIR / "fidelity.json").metadata.cpu == "AVX2, oneDNN AVX2, MKL AVX2"
    compared = project.runpytest_subprocess(*args)
    assert compared.ret == 0, text(compared)
    assert "other CPU kernels" not in text(compared)


def test_pin_kernels_names_a_clashing_variable_and_kernels_chosen_before_it(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_pins(monkeypatch)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    result = project.runpytest_subprocess("-p", "no:cacheprovider", *TINY, "--eq-pin-kernels")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, text(result)
    assert (
        "ERROR: --eq-pin-kernels pins ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2, "
        "but the environment sets MKL_CBWR=COMPATIBLE: unset it"
    ) in text(result)
    monkeypatch.delenv("MKL_CBWR")
    # A conftest whose import runs a tensor op with other kernels: ATen keeps its first choice.
    project.makeconftest(
        CONFTEST + "import os\nimport torch\n\nos.environ['ATEN_CPU_CAPABILITY'] = 'default'\n"
        "torch.ones(64).sum()\ndel os.environ['ATEN_CPU_CAPABILITY']\n"
    )
    result = project.runpytest_subprocess("-p", "no:cacheprovider", *TINY, "--eq-pin-kernels")
    assert result.ret == pytest.ExitCode.USAGE_ERROR, text(result)
    output = text(result)
    assert "ERROR: --eq-pin-kernels: torch runs DEFAULT kernels, not AVX2. Either this CPU lacks AVX2" in output
    assert "set ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 in the environment instead" in output
    assert_no_internal_traceback(result)


@pytest.mark.slow
def test_digits_passes_with_real_accuracy_and_no_deprecation_warnings(pytester: pytest.Pytester) -> None:
    # A fresh interpreter in an empty directory: also proves that importing torch.ao through
    # the plugin adds nothing to the user's warnings summary.
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-v", "--eq-pin-kernels", "--eq-model", "digits", f"--eq-baseline-dir={REPO_BASELINES}"
    )
    output = text(result)
    assert result.ret == 0, output
    ids = passed_ids(result)
    result.assert_outcomes(passed=len(ids))
    assert expected_layout(ids) == set(baseline_files(REPO_BASELINES / "digits-none/w8a8"))
    assert HEADER.search(output)
    accuracy = re.search(r"accuracy\.float\.top1\s+(\S+)\s+(\S+)\s+(\S+)\s+atol", output)
    assert accuracy, output
    baseline, now, delta = map(float, accuracy.groups())
    assert 0.98 <= now <= 1.0 and baseline == pytest.approx(now) and delta == 0
    assert re.search(r"accuracy\.quantized\.top1\s+0\.9\d*", output)
    assert "DeprecationWarning" not in output and "warnings summary" not in output


@pytest.mark.slow
def test_w4a4_against_w8a8_names_what_moved(pytester: pytest.Pytester) -> None:
    result = run(
        pytester, "-p", "no:cacheprovider", "--eq-model", "digits", f"--eq-baseline-dir={REPO_BASELINES}",
        "--eq-recipe", "w4a4", "--eq-baseline-recipe", "w8a8", "-k", "fidelity or layer_sqnr", "--eq-no-plots",
    )
    output = text(result)
    assert result.ret == 1
    result.assert_outcomes(failed=2, deselected=36)
    assert_no_internal_traceback(result)
    assert re.search(r"metric\s+baseline\s+obtained\s+delta\s+tolerance", output)
    # The row: metric, baseline, obtained, signed delta, tolerance and where it came from.
    row = re.search(r"fidelity\.sqnr_db\s+(36\.\d+)\s+(\d+\.\d+)\s+(-\d+\.\d+)\s+atol=0\.1 rtol=0 \(baseline\)", output)
    assert row, output
    baseline, obtained, delta = map(float, row.groups())
    assert obtained < baseline - 10 and delta == pytest.approx(obtained - baseline, abs=1e-3)
    for layer in ("conv1", "layer1.conv1", "layer2.conv2", "down", "fc"):
        assert re.search(rf"layer_sqnr\.{re.escape(layer)}\s+\d+\.\d+\s+\d+\.\d+\s+-\d+\.\d+\s+atol=", output), layer
    assert "recipe: baseline w8a8, now w4a4" in output
    assert "easyquant[digits-none-w4a4]" in output


@pytest.mark.slow
def test_changing_a_recipe_in_place_names_the_difference(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import dataclasses
        from eqcore.quant.recipes import W4A4

        def pytest_easyquant_register(registry):
            registry.add_recipe(dataclasses.replace(W4A4, name="w8a8"))
        """
    )
    result = run(
        pytester, "-p", "no:cacheprovider", "--eq-model", "digits", f"--eq-baseline-dir={REPO_BASELINES}",
        "-k", "fidelity", "--eq-no-plots",
    )
    output = text(result)
    result.assert_outcomes(failed=1, deselected=37)
    assert re.search(r"fidelity\.sqnr_db\s+36\.\d+\s+1\d\.\d+\s+-", output), output
    assert "recipe.weight.bits: baseline 8, now 4" in output
    assert "recipe.activation.bits: baseline 8, now 4" in output
    assert_no_internal_traceback(result)


# --- writing baselines: xdist, repeated runs, kills --------------------------------------------


def test_update_with_xdist_writes_a_complete_valid_set(project: pytest.Pytester) -> None:
    models = ("--eq-model", "tiny", "--eq-model", "tiny2", "--eq-data", "data")
    ids = collected_ids(project, *models)
    stray = project.path / "baselines/tiny2-none/w8a8/stray.json"
    stray.parent.mkdir(parents=True)
    stray.write_text("{}")

    # Two models, two workers writing at the same time. (Meant to be one model per worker; with
    # pytest 9.2 and xdist 3.8 loadgroup does not group, so both workers write the same files.)
    result = project.runpytest_subprocess(*models, "--eq-update-baselines", "-n", "2", "-v")
    output = text(result)
    assert result.ret == 0, output
    result.assert_outcomes(passed=len(ids))
    for nodeid in ids:
        assert re.search(rf"\[gw\d\] .*PASSED {re.escape(nodeid)}\s*$", output, re.MULTILINE), nodeid
    assert "easyquant[tiny-none-w8a8]: 29 written" in output
    # The workers' reports reach the controller: unused files are reported once.
    assert f"unused baselines (1), not checked by any generated test:\n  {stray}" in output

    for model in ("tiny", "tiny2"):
        directory = project.path / f"baselines/{model}-none/w8a8"
        suite_ids = [i for i in ids if i.startswith(f"easyquant[{model}-none-w8a8]")]
        stored = set(baseline_files(directory)) - {Path("stray.json")}
        assert stored == expected_layout(suite_ids)
        for relative in stored:
            read_back(directory / relative)
        assert not temp_files(directory)
        assert read_json(directory / "fidelity.json").metadata.model == model

    stray.unlink()
    again = run(project, *models, "-p", "no:cacheprovider")
    assert again.ret == 0, text(again)
    again.assert_outcomes(passed=len(ids))
    assert "unused baselines" not in text(again)


READER = """
import sys, time
from pathlib import Path
from pytest_easyquant import cpu_kernels
from pytest_easyquant.errors import BaselineError
from pytest_easyquant.storage import read_json, read_npz, read_png
directory, stop = Path(sys.argv[1]), Path(sys.argv[2])
readers = {".json": read_json, ".npz": read_npz, ".png": read_png}
files = [directory / name for name in sys.argv[3:]]
reads = 0
print("STARTED", flush=True)
while not stop.exists():
    for path in files:
        try:
            readers[path.suffix](path)
            reads += 1
        except (BaselineError, OSError) as exc:  # MissingBaseline included: no file may vanish
            print("PROBLEM", path.name, exc, flush=True)
        time.sleep(0.002)
print("READS", reads, flush=True)
"""


def test_twenty_update_runs_never_leave_a_partial_file(project: pytest.Pytester) -> None:
    """20 in-process update runs (the xdist test above covers concurrent writers), while another
    process reads every baseline file over and over: no reader ever sees a partial or corrupt
    file, no temp file is left, and every run writes the same bytes. One plot of eight is kept
    (rendering dominates a tiny run), so JSON, NPZ and PNG files are all rewritten 20 times in
    ~10 s. The reader is a process, not a thread: np.load parses .npy headers with the ast
    module, which CPython 3.11 does not make safe against pytest's assertion rewriting parsing
    modules in another thread of the same interpreter (SystemError: AST constructor recursion
    depth mismatch)."""
    # no:unraisableexception: its gc.collect() at the end of each session takes half the time.
    args = (*TINY, "-p", "no:cacheprovider", "-p", "no:unraisableexception", "--eq-update-baselines",
            "-k", "not plot or activation_post_process_0")
    first = run(project, *args)
    assert first.ret == 0, text(first)
    directory = project.path / TINY_DIR
    reference = baseline_files(directory)
    assert {p.suffix for p in reference} == {".json", ".npz", ".png"} and len(reference) == 30

    stop = project.path / "stop-reading"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(directory), str(stop), *(str(p) for p in reference)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "STARTED"
        for _ in range(19):
            result = run(project, *args)
            assert result.ret == 0, text(result)
            assert not temp_files(directory)
            assert baseline_files(directory) == reference
    finally:
        stop.touch()
        output, _ = reader.communicate(timeout=120)
    lines = output.splitlines()
    problems = [line for line in lines if not line.startswith("READS")]
    assert reader.returncode == 0 and not problems, problems[:5]
    reads = int(lines[-1].split()[1])
    assert reads > len(reference)


@pytest.mark.slow
def test_killed_update_leaves_previous_baselines_readable(pytester: pytest.Pytester) -> None:
    baselines = pytester.path / "baselines"
    shutil.copytree(REPO_BASELINES / "digits-none", baselines / "digits-none")
    directory = baselines / "digits-none/w8a8"
    before = baseline_files(directory)
    old_mtime = {p: (directory / p).stat().st_mtime_ns for p in before}

    # --eq-seed 1 changes the metadata of every JSON/NPZ file, so each file is either old or new.
    process = pytester.popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--eq-model", "digits",
         "--eq-baseline-dir=baselines", "--eq-update-baselines", "--eq-seed", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            fresh = [p for p in before if (directory / p).stat().st_mtime_ns != old_mtime[p]]
            if len(fresh) >= 3:  # well into the update: some files replaced, most not yet
                break
            time.sleep(0.005)
        assert process.poll() is None, "the update finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL

    after = baseline_files(directory)
    assert set(after) == set(before), "a baseline file disappeared"
    replaced = 0
    for relative, data in after.items():
        content = read_back(directory / relative)
        if data == before[relative]:
            continue
        replaced += 1
        if relative.suffix in (".json", ".npz"):
            assert content.metadata.seed == 1, relative
    assert 3 <= replaced < len(before)


# --- bad input: one clear line, no traceback ---------------------------------------------------


NO_CUDA = "cuda" if not torch.cuda.is_available() else "cuda:99"


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(("--eq-model", "resnet81"),
                     "--eq-model resnet81: unknown model 'resnet81'. Did you mean resnet18", id="unknown-model"),
        pytest.param((*TINY, "--eq-weights", "missing.pt"),
                     "--eq-model tiny: weights file 'missing.pt' does not exist", id="weights-missing"),
        pytest.param((*TINY, "--eq-weights", "list.pt"),
                     "--eq-model tiny: weights file 'list.pt' holds a list, not a state dict", id="weights-not-state-dict"),
        pytest.param((*TINY, "--eq-weights", "garbage.pt"),
                     "--eq-model tiny: cannot load weights file 'garbage.pt' with torch.load(weights_only=True)",
                     id="weights-not-torch"),
        pytest.param((*TINY, "--eq-weights", "other.pt"),
                     "--eq-model tiny: weights file 'other.pt' does not fit model 'tiny': "
                     "1 shape mismatches ['conv1.weight: file (5, 3, 3, 3) vs model (4, 3, 3, 3)']",
                     id="weights-do-not-fit"),
        pytest.param((*TINY, "--eq-recipe", "w3a3"),
                     "--eq-model tiny: unknown recipe 'w3a3'; choose one of w8a8, ", id="unknown-recipe"),
        pytest.param(("--eq-model", "tiny", "--eq-data", "empty"),
                     "--eq-model tiny: data directory 'empty' contains no images", id="data-empty"),
        pytest.param(("--eq-model", "tiny", "--eq-data", "nowhere"),
                     "--eq-model tiny: --eq-data 'nowhere' is neither a built-in data set", id="data-missing"),
        pytest.param((*TINY, "--eq-tolerance", "fidelity.* atol=abc"),
                     "--eq-tolerance: bad tolerance rule 'fidelity.* atol=abc': atol value 'abc' is not a number",
                     id="tolerance-not-number"),
        pytest.param(("--eq-model", "noquant", "--eq-data", "data"),
                     "--eq-model noquant: NoQuantizers has no layer the recipe 'w8a8' quantizes", id="no-quantizers"),
        pytest.param((*TINY, "--eq-device", NO_CUDA), f"--eq-device {NO_CUDA}: ", id="device-no-cuda"),
        pytest.param((*TINY, "--eq-device", "gpu"),
                     "--eq-device expects cpu, cuda or cuda:N, got 'gpu'", id="device-unknown"),
        pytest.param((*TINY, "--eq-calib-batches", "x"),
                     "--eq-calib-batches expects an integer, got 'x'", id="int-option"),
        pytest.param((*TINY, "--eq-batch-size", "0"),
                     "--eq-batch-size must be a positive integer, got '0'", id="int-zero"),
    ],
)
def test_bad_option_is_one_usage_error_line(project: pytest.Pytester, args: tuple[str, ...], message: str) -> None:
    torch.save([torch.zeros(1)], project.path / "list.pt")
    (project.path / "garbage.pt").write_bytes(b"not a torch file")
    state = Tiny().state_dict()
    state["conv1.weight"] = torch.zeros(5, 3, 3, 3)
    torch.save(state, project.path / "other.pt")
    (project.path / "empty").mkdir()
    result = run(project, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR:")]
    assert len(errors) == 1 and errors[0].startswith("ERROR: " + message), result.errlines
    assert_no_internal_traceback(result)


def test_bad_ini_value_names_the_ini_option(project: pytest.Pytester) -> None:
    project.makeini("[pytest]\neq_sa_batches = many\n")
    result = run(project, *TINY)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ERROR: ini option eq_sa_batches expects an integer, got 'many'" in result.errlines


def test_corrupt_baselines_fail_their_checks_with_one_line_each(project: pytest.Pytester) -> None:
    written = run(project, *TINY, "--eq-update-baselines")
    assert written.ret == 0, text(written)
    directory = project.path / TINY_DIR
    (directory / "fidelity.json").write_text('{"values": {"sqnr_db": 3')
    npz = directory / "histograms/weights/conv1.npz"
    npz.write_bytes(npz.read_bytes()[:300])
    truncated_png = directory / "plots/weight-sa-fc.png"
    truncated_png.write_bytes(truncated_png.read_bytes()[:200])
    (directory / "plots/weight-sa-conv1.png").write_bytes(b"GIF89a not a png")
    edit_json(directory / "layer_sqnr.json", lambda d: d.update(schema_version=2))

    result = run(project, *TINY)
    result.assert_outcomes(passed=24, failed=5)
    output = text(result)
    where = re.escape(str(directory))
    expected = {
        "fidelity": rf"baseline {where}/fidelity.json is not valid JSON \(line 1 column \d+: .*\), perhaps truncated",
        "weight_hist[conv1]": rf"baseline {where}/histograms/weights/conv1.npz is not a readable NPZ .*perhaps truncated",
        "plot[weight-sa-fc]": rf"baseline {where}/plots/weight-sa-fc.png is truncated inside its 'IDAT' chunk",
        "plot[weight-sa-conv1]": rf"baseline {where}/plots/weight-sa-conv1.png does not start with the PNG signature",
        "layer_sqnr": rf"baseline {where}/layer_sqnr.json has schema version 2, this pytest-easyquant reads version 1",
    }
    commands = {}
    for check, pattern in expected.items():
        # The failure section of each check is its one line, which says how to re-record.
        section = re.search(rf"_ easyquant\[tiny-none-w8a8\]::{re.escape(check)} _+\n(.*)\n", output)
        assert section, check
        match = re.fullmatch(pattern + r".*; re-record it with: (pytest .*)", section.group(1))
        assert match, section.group(1)
        commands[check] = match.group(1)
    assert_no_internal_traceback(result)
    # Nothing was touched: the broken files are still the broken files.
    assert (directory / "plots/weight-sa-conv1.png").read_bytes() == b"GIF89a not a png"

    # Each printed command, run as printed, re-records exactly its check's files.
    intact = directory / "qparams/conv1.weight_fake_quant.json"
    before = intact.read_bytes()
    for check, command in commands.items():
        assert "--eq-model tiny" in command and "--eq-data data" in command and "allow_pickle" not in command
        repaired = run(project, *shlex.split(command)[1:])
        assert repaired.ret == 0, text(repaired)
        repaired.assert_outcomes(passed=1, deselected=28)
    assert intact.read_bytes() == before
    run(project, *TINY).assert_outcomes(passed=29)


def test_nan_activations_name_the_module(project: pytest.Pytester) -> None:
    result = run(project, "--eq-model", "nannet", "--eq-data", "data", "--eq-no-plots", "--eq-update-baselines")
    output = text(result)
    summary = result.parseoutcomes()
    assert summary["failed"] == 20 and "passed" not in summary
    lines = set(re.findall(r"^running model 'nannet' failed: (.*)$", output, re.MULTILINE))
    assert len(lines) == 1, lines
    (line,) = lines
    assert re.match(r"activation_post_process_3 produced \d+ NaN and 0 inf values during calibration", line), line
    assert_no_internal_traceback(result)
    # Nothing half-computed was written.
    assert not (project.path / "baselines").exists()


def test_only_a_failed_calibration_looks_for_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A calibration that succeeds runs no NaN check (two ops per quantizer call); a failed one
    runs the batches again to name the first quantizer whose input holds NaN."""
    from eqcore.errors import EQError
    from eqcore.prepare.quantize import fake_quant_modules, prepare
    from pytest_easyquant.pipeline import _calibrate

    batches = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    checks = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: checks.append(x.shape) or isfinite(x))
    torch.manual_seed(0)
    prepared = prepare(Tiny(), "w8a8", (batches[0],), backend="fx")
    _calibrate(prepared.model, batches, torch.device("cpu"))
    assert checks == []
    assert not any(m._observer_buffer().item() for m in fake_quant_modules(prepared.model).values())

    broken = prepare(NaNNet(), "w8a8", (batches[0],), backend="fx").model
    with pytest.raises(EQError, match=r"^activation_post_process_3 produced \d+ NaN and 0 inf values during "
                                      r"calibration, and its observer failed on them \(") as info:
        _calibrate(broken, batches, torch.device("cpu"))
    nans = int(re.search(r"produced (\d+) NaN", str(info.value)).group(1))
    assert 0 < nans < batches[0].numel()
    assert checks  # only now
    quantizers = fake_quant_modules(broken)
    assert not any(m._forward_pre_hooks for m in quantizers.values())  # the search leaves no hook behind
    assert all(m._observer_buffer().item() for m in quantizers.values())  # as the failed calibration left them


def test_nan_activations_with_a_nan_tolerant_observer_fail_the_histogram_check(project: pytest.Pytester) -> None:
    result = run(
        project, "--eq-model", "nannet", "--eq-data", "data", "--eq-no-plots", "--eq-recipe", "w8a8-mse",
        "--eq-update-baselines", "-k", "act_hist or fidelity",
    )
    output = text(result)
    assert re.search(r"^activation_post_process_3 produced \d+ NaN and 0 inf values", output, re.MULTILINE), output
    assert "the fake-quant model's output contains NaN or inf" in output
    assert "FAILED easyquant[nannet-none-w8a8-mse]::act_hist[activation_post_process_3]" in output
    assert_no_internal_traceback(result)


# --- determinism ------------------------------------------------------------------------------


def test_two_runs_write_identical_files_and_output_stays_clean(project: pytest.Pytester) -> None:
    first = run(project, *TINY, "--eq-update-baselines", "--eq-baseline-dir=run1")
    assert first.ret == 0, text(first)
    # The second in a fresh interpreter, which also shows what a user's session prints.
    second = project.runpytest_subprocess(*TINY, "--eq-update-baselines", "--eq-baseline-dir=run2")
    output = text(second)
    assert second.ret == 0, output
    assert "DeprecationWarning" not in output and "warnings summary" not in output

    one = baseline_files(project.path / "run1/tiny-none/w8a8")
    two = baseline_files(project.path / "run2/tiny-none/w8a8")
    assert len(one) == 38 and one.keys() == two.keys()
    assert [p for p in one if one[p] != two[p]] == []
    for relative in (p for p in one if p.suffix == ".png"):
        row = compare_image("image", one[relative], two[relative], Tolerance(), "default", results_dir=project.path / "cmp")
        assert row.passed and row.obtained == 0.0


# --- node ids and selection -------------------------------------------------------------------


def test_node_ids_are_stable_and_selectable(project: pytest.Pytester) -> None:
    project.makepyfile(test_user="def test_plain():\n    pass\n")
    digits = collected_ids(project, "--eq-model", "digits", "-p", "no:cacheprovider")
    assert "easyquant[digits-none-w8a8]::fidelity" in digits
    assert "easyquant[digits-none-w8a8]::qparams[layer1.conv1.weight_fake_quant]" in digits
    assert "easyquant[digits-none-w8a8]::plot[weight-sa-layer2.conv2]" in digits
    ids = collected_ids(project, *TINY, "--eq-no-plots")
    assert ids == collected_ids(project, *TINY, "--eq-no-plots")
    assert "easyquant[tiny-none-w8a8]::act_hist[activation_post_process_0]" in ids
    assert "test_user.py::test_plain" in ids

    assert run(project, *TINY, "--eq-update-baselines", "--eq-no-plots").ret == 0
    fidelity = run(project, *TINY, "--eq-no-plots", "-k", "fidelity")
    fidelity.assert_outcomes(passed=1, deselected=20)
    assert "easyquant[tiny-none-w8a8]: 1 passed" in text(fidelity)

    marked = run(project, *TINY, "--eq-no-plots", "-m", "easyquant", "-v")
    marked.assert_outcomes(passed=20, deselected=1)
    assert "test_plain" not in text(marked)
    unmarked = run(project, *TINY, "--eq-no-plots", "-m", "not easyquant")
    unmarked.assert_outcomes(passed=1, deselected=20)

    edit_json(project.path / TINY_DIR / "fidelity.json", lambda d: d["values"].update(sqnr_db=d["values"]["sqnr_db"] + 1))
    failing = run(project, *TINY, "--eq-no-plots")
    failing.assert_outcomes(passed=20, failed=1)
    rerun = run(project, *TINY, "--eq-no-plots", "--lf")
    rerun.assert_outcomes(failed=1, deselected=20)
    assert "FAILED easyquant[tiny-none-w8a8]::fidelity" in text(rerun)


# --- missing and unused baselines -------------------------------------------------------------


def test_missing_baseline_says_how_to_create_it(project: pytest.Pytester) -> None:
    result = run(project, *TINY, "--eq-no-plots", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=20)
    assert_no_internal_traceback(result)
    output = text(result)
    # Each check fails with its one line; the command is printed once, in the summary.
    reasons = re.findall(r"^no baseline at (\S+) \(the easyquant summary has the command that records it\)$", output, re.MULTILINE)
    assert len(reasons) == 20 and "baselines/tiny-none/w8a8/fidelity.json" in reasons, output
    commands = re.findall(r"^  20 checks have no baseline yet; record them with: (pytest .*)$", output, re.MULTILINE)
    assert len(commands) == 1, output
    (command,) = commands
    assert output.count(command) == 1
    assert command.endswith("--eq-update-new-only") and "--eq-model tiny" in command

    created = run(project, *shlex.split(command)[1:])
    assert created.ret == 0, text(created)
    assert "easyquant[tiny-none-w8a8]: 20 written" in text(created)
    run(project, *TINY, "--eq-no-plots", "-p", "no:cacheprovider").assert_outcomes(passed=20)


def test_a_recipe_without_baselines_points_to_the_recorded_ones(project: pytest.Pytester) -> None:
    assert run(project, *TINY, "--eq-no-plots", "-k", "fidelity", "--eq-update-baselines").ret == 0
    hint = "baselines of this model exist for recipe w8a8: to see what moves against them, run with --eq-baseline-recipe w8a8"

    result = run(project, *TINY, "--eq-no-plots", "-k", "fidelity", "--eq-recipe", "w4a4")
    result.assert_outcomes(failed=1, deselected=19)
    output = text(result)
    assert re.search(r"^no baseline at .*w4a4/fidelity\.json \(the easyquant summary", output, re.MULTILINE)
    assert re.search(r"^  1 check has no baseline yet; record it with: pytest .*--eq-recipe w4a4 --eq-no-plots --eq-update-new-only$", output, re.MULTILINE)
    summary = output.partition("= easyquant summary =")[2].partition("short test summary info")[0]
    assert summary.count(hint) == 1 and output.count(hint) == 1, output

    against = run(project, *TINY, "--eq-no-plots", "-k", "fidelity", "--eq-recipe", "w4a4", "--eq-baseline-recipe", "w8a8")
    assert "recipe: baseline w8a8, now w4a4" in text(against)
    assert hint not in text(against)


def test_update_new_only_writes_only_missing_files(project: pytest.Pytester) -> None:
    directory = project.path / TINY_DIR
    assert run(project, *TINY, "--eq-update-baselines", "-k", "fidelity or layer_sqnr").ret == 0
    existing = baseline_files(directory)
    assert set(existing) == {Path("fidelity.json"), Path("layer_sqnr.json")}
    edit_json(directory / "fidelity.json", lambda d: d["values"].update(sqnr_db=d["values"]["sqnr_db"] + 1))
    changed = (directory / "fidelity.json").read_bytes()
    for relative in existing:
        os.utime(directory / relative, ns=(10**18, 10**18))

    result = run(project, *TINY, "--eq-update-new-only")
    # The existing baselines are compared (the edited one fails), the others written.
    result.assert_outcomes(passed=28, failed=1)
    assert "FAILED easyquant[tiny-none-w8a8]::fidelity" in text(result)
    assert "easyquant[tiny-none-w8a8]: 1 failed, 1 passed, 27 written" in text(result)
    assert (directory / "fidelity.json").read_bytes() == changed
    for relative in existing:
        assert (directory / relative).stat().st_mtime_ns == 10**18
    assert len(baseline_files(directory)) == 38


def test_unused_baselines_are_reported_respecting_the_selection(project: pytest.Pytester) -> None:
    directory = project.path / TINY_DIR
    assert run(project, *TINY, "--eq-update-baselines", "--eq-no-plots").ret == 0
    stray = directory / "qparams/renamed_layer.weight_fake_quant.json"
    shutil.copy(directory / "qparams/conv1.weight_fake_quant.json", stray)

    result = run(project, *TINY, "--eq-no-plots", "-k", "qparams")
    assert result.ret == 0, text(result)
    lines = result.outlines
    start = next(i for i, line in enumerate(lines) if line.startswith("unused baselines (1)"))
    assert lines[start + 1].strip() == str(stray)
    assert not lines[start + 2].startswith("  /")
    # Files of deselected checks are not unused, and neither are temp files of killed writers.
    (directory / ".fidelity.json.abc.tmp").write_text("partial")
    result = run(project, *TINY, "--eq-no-plots", "-k", "fidelity")
    assert f"unused baselines (1), not checked by any generated test:\n  {stray}" in text(result)
    stray.unlink()
    assert "unused baselines" not in text(run(project, *TINY, "--eq-no-plots"))


# --- tolerances -------------------------------------------------------------------------------


def test_tolerance_precedence_cli_over_ini_over_baseline_over_default(project: pytest.Pytester) -> None:
    args = (*TINY, "--eq-no-plots", "-k", "fidelity", "-p", "no:cacheprovider")
    assert run(project, *args, "--eq-update-baselines").ret == 0
    path = project.path / TINY_DIR / "fidelity.json"
    assert read_json(path).tolerance["fidelity.sqnr_db"] == {"atol": 0.1, "rtol": 0.0}
    edit_json(path, lambda d: d["values"].update(sqnr_db=d["values"]["sqnr_db"] + 0.3))

    outside = run(project, *args)
    outside.assert_outcomes(failed=1, deselected=19)
    # The tolerance recorded with the baseline is echoed, with its source.
    assert re.search(r"fidelity\.sqnr_db\s+\S+\s+\S+\s+-0\.3\s+atol=0\.1 rtol=0 \(baseline\)", text(outside)), text(outside)

    project.makeini("[pytest]\neq_tolerance =\n    fidelity.* atol=1\n")
    run(project, *args).assert_outcomes(passed=1, deselected=19)

    cli = run(project, *args, "--eq-tolerance", "fidelity.sqnr_db atol=0.2")
    cli.assert_outcomes(failed=1, deselected=19)
    assert re.search(r"fidelity\.sqnr_db\s+\S+\s+\S+\s+-0\.3\s+atol=0\.2 rtol=0 \(cli\)", text(cli))

    # Without ini and CLI: the baseline's own tolerance beats the default.
    (project.path / "tox.ini").unlink()
    edit_json(path, lambda d: d["tolerance"].update({"fidelity.sqnr_db": {"atol": 0.5, "rtol": 0}}))
    run(project, *args).assert_outcomes(passed=1, deselected=19)
    edit_json(path, lambda d: d["tolerance"].pop("fidelity.sqnr_db"))
    default = run(project, *args)
    default.assert_outcomes(failed=1, deselected=19)
    assert re.search(r"fidelity\.sqnr_db\s+\S+\s+\S+\s+-0\.3\s+atol=0\.1 rtol=0 \(default\)", text(default))


def test_marker_tolerance_wins_for_users_tests(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    project.makepyfile(
        test_values="""
        import os
        import pytest

        VALUE = float(os.environ.get("EQ_VALUE", "1.0"))

        @pytest.mark.eq_tolerance("level.x atol=1")
        def test_marked(eq_baseline):
            eq_baseline.check("level", {"x": VALUE})

        def test_unmarked(eq_baseline):
            eq_baseline.check("level", {"x": VALUE})

        def test_call_tolerance(eq_baseline):
            eq_baseline.check("level", {"x": VALUE}, tolerances={"level.*": "atol=0.6"})
        """
    )
    assert run(project, "--eq-update-baselines").ret == 0
    assert read_json(project.path / "baselines/tests/test_values/test_marked/level.json").values == {"x": 1.0}
    monkeypatch.setenv("EQ_VALUE", "1.5")
    result = run(project, "--eq-tolerance", "level.* atol=0.1", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    assert "FAILED test_values.py::test_unmarked" in text(result)
    assert re.search(r"level\.x\s+1\s+1\.5\s+\+0\.5\s+atol=0\.1 rtol=0 \(cli\)", text(result)), text(result)
    assert_no_internal_traceback(result)


def test_bad_tolerance_in_a_users_test_fails_it_with_one_line(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_values="""
        import pytest

        @pytest.mark.eq_tolerance("level.x atol=abc")
        def test_bad_marker(eq_baseline):
            eq_baseline.check("level", {"x": 1.0})

        def test_bad_argument(eq_baseline):
            eq_baseline.check("level", {"x": 1.0}, tolerances={"level.*": "atol=zz"})
        """
    )
    result = run(project, "--eq-update-baselines", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    assert_no_internal_traceback(result)
    output = text(result)
    assert re.search(
        r"_ test_bad_marker _+\ntest_values\.py::test_bad_marker: bad eq_tolerance marker: bad tolerance rule "
        r"'level\.x atol=abc': atol value 'abc' is not a number; expected .*\n_", output
    ), output
    assert re.search(
        r"_ test_bad_argument _+\nbad tolerances= for 'level': bad tolerance rule 'level\.\* atol=zz': "
        r"atol value 'zz' is not a number; expected .*\n=", output
    ), output
    assert not (project.path / "baselines").exists()


# --- images and reports -----------------------------------------------------------------------


def test_changed_plot_fails_with_rms_and_leaves_images_and_html_report(project: pytest.Pytester) -> None:
    from PIL import Image

    assert run(project, *TINY, "--eq-update-baselines", "-k", "plot or fidelity").ret == 0
    baseline = project.path / TINY_DIR / "plots/act-sa-activation_post_process_1.png"
    with Image.open(baseline) as image:
        size = image.size
        changed = image.convert("RGB")
    changed.paste((0, 0, 0), (10, 10, 60, 40))
    changed.save(baseline)
    with Image.open(baseline) as image:
        assert image.size == size

    result = run(project, *TINY, "-k", "plot or fidelity", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=9, failed=1, deselected=19)
    output = text(result)
    assert_no_internal_traceback(result)
    rms = re.search(r"RMS pixel difference (\S+) \(0-255 scale\) > 1", output)
    assert rms and float(rms.group(1)) > 1, output
    assert re.search(r"image\.act-sa-activation_post_process_1\s+0\s+\d+\.\d+\s+\+\d+\.\d+\s+atol=1 rtol=0 \(default\)", output)
    images = {name: re.search(rf"^\s*{name}:\s+(\S+\.png)$", output, re.MULTILINE) for name in ("baseline", "result", "diff")}
    assert all(images.values()), output
    paths = {name: Path(match.group(1)) for name, match in images.items()}
    results_dir = project.path / ".eq-results"
    for path in paths.values():
        assert path.is_file() and results_dir in path.parents
        read_png(path)
    assert paths["baseline"].read_bytes() == baseline.read_bytes()

    report = results_dir / "report.html"
    assert f"easyquant report: {report}" in output
    page = report.read_text()
    # The failing check appears once, its three images inline (tests/test_plugin_report.py has more).
    assert page.count('data-check="easyquant[tiny-none-w8a8]::plot[act-sa-activation_post_process_1]"') == 1
    sources = re.findall(r'<img src="([^"]+)"', page)
    # The failure's three images, and the sensitivity bars every report shows.
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert page.count('data-role="sensitivity"') == 1


def test_terminal_summary_per_model(project: pytest.Pytester) -> None:
    assert run(project, *TINY, "--eq-model", "tiny2", "--eq-update-baselines", "--eq-no-plots").ret == 0
    result = run(project, *TINY, "--eq-model", "tiny2", "--eq-no-plots")
    output = text(result)
    summary = output.split("easyquant summary", 1)[1]
    for model in ("tiny", "tiny2"):
        block = summary.split(f"easyquant[{model}-none-w8a8]: 20 passed", 1)[1]
        assert HEADER.match(block.strip().splitlines()[0].strip())
        assert re.search(r"accuracy\.quantized\.top1\s+0\.\d+\s+0\.\d+\s+0\s+atol=0\.01 rtol=0", block)
        assert re.search(r"fidelity\.sqnr_db\s+\d+\.\d+\s+\d+\.\d+\s+0\s+atol=0\.1 rtol=0", block)


# --- users' fixtures and models ---------------------------------------------------------------


USER_TEST = """
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
import torch


@pytest.mark.eq_model("digits")
def test_digits_quantization(eq_model, eq_loaders, eq_prepared, eq_sa, eq_baseline):
    assert eq_model.name == "digits" and eq_loaders.has_labels
    images, labels = next(iter(eq_loaders.eval))
    with torch.no_grad():
        quantized = eq_prepared.model(images)
        reference = eq_prepared.float_model(images)
    agreement = (quantized.argmax(1) == reference.argmax(1)).float().mean()
    eq_baseline.check("agreement", {"top1": agreement, "batch": len(labels)})
    eq_baseline.check_arrays("logits", {"quantized": quantized[:4], "float": reference[:4]})
    name, activation = next(iter(eq_sa.activations.items()))
    figure, axes = plt.subplots(figsize=(3, 2), dpi=50)
    axes.bar(range(len(activation.hist)), activation.hist)
    axes.set_title(name)
    eq_baseline.check_image(figure, "first-activation")
    plt.close(figure)
"""


def test_user_fixtures_record_compare_and_fail(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TEST)
    args = ("--eq-calib-batches", "1", "--eq-batch-size", "16", "-p", "no:cacheprovider")
    directory = pytester.path / "baselines/tests/test_user/test_digits_quantization"

    missing = run(pytester, *args)
    missing.assert_outcomes(failed=1)
    relative = directory.relative_to(pytester.path)
    assert re.search(rf"no baseline at {relative}/agreement.json \(the easyquant summary has the command", text(missing))
    command = re.search(r"record it with: (pytest .*test_user.py::test_digits_quantization .*--eq-update-new-only)$", text(missing), re.MULTILINE)
    assert command, text(missing)
    assert_no_internal_traceback(missing)

    written = run(pytester, *shlex.split(command.group(1))[1:])
    written.assert_outcomes(passed=1)
    assert "tests/test_digits_quantization: 3 written" in text(written)
    assert {p.name for p in directory.iterdir()} == {"agreement.json", "logits.npz", "first-activation.png", "metadata.json"}
    recorded = read_json(directory / "agreement.json").values
    assert recorded.keys() == {"top1", "batch"} and 0.5 < recorded["top1"] <= 1 and recorded["batch"] == 16
    assert set(read_npz(directory / "logits.npz").arrays) == {"quantized", "float"}

    run(pytester, *args).assert_outcomes(passed=1)

    edit_json(directory / "agreement.json", lambda d: d["values"].update(top1=recorded["top1"] - 0.25))
    changed = run(pytester, *args)
    changed.assert_outcomes(failed=1)
    assert re.search(r"agreement\.top1\s+\S+\s+\S+\s+\+0\.25\s+atol=1e-06 rtol=1e-06 \(baseline\)", text(changed)), text(changed)
    assert_no_internal_traceback(changed)


def test_registered_model_and_recipe_and_factory_path(project: pytest.Pytester) -> None:
    models = ("--eq-model", "tiny", "--eq-model", "plugin_models:build_tiny", "--eq-recipe", "w6a8", "--eq-data", "data")
    ids = collected_ids(project, *models)
    suites = sorted({i.split("::")[0] for i in ids})
    assert suites[0].startswith("easyquant[plugin_models-build_tiny-") and suites[0].endswith("-none-w6a8]")
    assert suites[1] == "easyquant[tiny-none-w6a8]"

    written = run(project, *models, "--eq-update-baselines", "-p", "no:cacheprovider")
    assert written.ret == 0, text(written)
    metadata = read_json(project.path / "baselines/tiny-none/w6a8/fidelity.json").metadata
    assert metadata.recipe["name"] == "w6a8" and metadata.recipe["weight"]["bits"] == 6
    assert metadata.data == "data"
    assert len(list((project.path / "baselines").glob("plugin_models-build_tiny-*/w6a8/fidelity.json"))) == 1

    again = run(project, *models, "-p", "no:cacheprovider")
    again.assert_outcomes(passed=len(ids))
    assert re.search(r"accuracy\.float\.top1\s+0\.\d+\s+0\.\d+\s+0\s+atol", text(again))
