"""Baseline storage: atomic writes under concurrency and kills, byte-identical files, and one
clear BaselineError naming the file for anything missing, corrupt, truncated or foreign."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pytest_easyquant.atomic_files import atomic_write_bytes, cleanup_temp_files
from pytest_easyquant.baseline_usage import UsageTracker
from pytest_easyquant.errors import BaselineError, MissingBaseline
from pytest_easyquant.storage import (
    SCHEMA_VERSION,
    BaselineMetadata,
    read_json,
    read_npz,
    read_png,
    write_json,
    write_npz,
    write_png,
)

REPO = Path(__file__).resolve().parents[1]


def metadata(**changes: object) -> BaselineMetadata:
    values = dict(
        model="resnet18", weights="none", recipe={"name": "w8a8", "weight": {"bits": 8, "range": (-128, 127)}},
        data="samples", seed=0, calib_batches=2, device="cpu", torch="2.14.1", torchvision="0.29.1",
        numpy="2.4.6", matplotlib="3.11.2", pytest_easyquant="0.1.0",
    )
    values.update(changes)
    return BaselineMetadata(**values)


def temp_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob(".*.tmp"))


def python(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env)


def png_bytes(label: str = "a") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5, 1.0), dpi=40)
    ax.plot([0, 1, 2], [0, 1, 0] if label == "a" else [1, 0, 1])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


# --- atomic writes -------------------------------------------------------------------------


def test_atomic_write_creates_parents_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert temp_files(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_previous_file_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_bytes(target, b"previous")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, 12345)  # type: ignore[arg-type]  # not bytes: fails mid-write
    assert target.read_bytes() == b"previous"
    assert temp_files(tmp_path) == []


WRITER = """
import hashlib, sys
from pathlib import Path
from pytest_easyquant.atomic_files import atomic_write_bytes
path, writer, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for n in range(count):
    body = bytes([(writer * 31 + n) % 251]) * (50_000 + 997 * n)
    header = f"{writer} {n} {hashlib.sha1(body).hexdigest()}\\n".encode()
    atomic_write_bytes(path, header + body)
"""


def check_versioned(data: bytes) -> tuple[int, int]:
    header, _, body = data.partition(b"\n")
    writer, n, digest = header.decode().split()
    assert hashlib.sha1(body).hexdigest() == digest, "partial or mixed file seen"
    return int(writer), int(n)


def test_concurrent_writers_never_expose_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "shared" / "same.npz"
    atomic_write_bytes(target, b"0 0 " + hashlib.sha1(b"").hexdigest().encode() + b"\n")
    writers = [python(WRITER, str(target), str(i), "40") for i in range(1, 4)]
    seen = set()
    while any(w.poll() is None for w in writers):
        seen.add(check_versioned(target.read_bytes()))
    assert all(w.wait() == 0 for w in writers)
    last = check_versioned(target.read_bytes())
    assert last[1] == 39  # the final file is one writer's complete last version
    assert len(seen) > 1
    assert temp_files(tmp_path) == []


def test_concurrent_json_writers_and_reader(tmp_path: Path) -> None:
    code = """
import sys
from pathlib import Path
from pytest_easyquant.storage import BaselineMetadata, write_json
meta = BaselineMetadata.current(model="m", weights="none", recipe={"name": "w8a8"}, data="d", seed=0, calib_batches=1, device="cpu")
for n in range(30):
    write_json(Path(sys.argv[1]), values={"writer": int(sys.argv[2]), "n": n, "blob": [n / 7] * 5000}, metadata=meta)
"""
    target = tmp_path / "fidelity.json"
    write_json(target, values={"writer": 0, "n": 0, "blob": []}, metadata=metadata())
    writers = [python(code, str(target), str(i)) for i in (1, 2)]
    reads = 0
    while any(w.poll() is None for w in writers):
        stored = read_json(target)  # raises BaselineError on any partial file
        assert len(stored.values["blob"]) in (0, 5000)
        reads += 1
    assert all(w.wait() == 0 for w in writers)
    assert read_json(target).values["n"] == 29
    assert reads > 0


KILLED = """
import sys
from pathlib import Path
from pytest_easyquant.atomic_files import atomic_write_bytes
atomic_write_bytes(Path(sys.argv[1]), b"n" * int(sys.argv[2]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_writer_killed_mid_write_leaves_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "qparams" / "x.json"
    write_json(target, values={"scale": [0.5]}, metadata=metadata())
    previous = target.read_bytes()
    size = 128 * 1024 * 1024
    writer = python(KILLED, str(target), str(size))
    deadline = time.monotonic() + 20
    while not temp_files(tmp_path) and writer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    stray = temp_files(tmp_path)
    data = target.read_bytes()
    if stray:  # killed before os.replace: the previous file must be untouched
        assert data == previous
        assert read_json(target).values == {"scale": [0.5]}
    else:  # (rarely) the write finished first: then it is the whole new file
        assert data in (previous, b"n" * size)
    assert cleanup_temp_files(tmp_path, older_than=3600) == []  # a fresh temp may be a live writer's
    assert cleanup_temp_files(tmp_path, older_than=0) == stray
    assert temp_files(tmp_path) == []


def test_cleanup_temp_files_only_removes_old_temp_files(tmp_path: Path) -> None:
    old = tmp_path / "a" / ".x.json.abc123.tmp"
    young = tmp_path / ".y.npz.def456.tmp"
    keep = [tmp_path / "x.json", tmp_path / "notes.tmp", tmp_path / ".gitkeep"]
    for path in (old, young, *keep):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert cleanup_temp_files(tmp_path, older_than=3600) == [old]
    assert not old.exists() and young.exists() and all(p.exists() for p in keep)
    assert cleanup_temp_files(tmp_path / "nothing-here") == []


# --- JSON ----------------------------------------------------------------------------------

VALUES = {
    "fidelity": {"sqnr_db": 31.245678901234567, "kl": 1e-310, "third": 1 / 3, "tenth": 0.1},
    "special": [math.nan, math.inf, -math.inf, -0.0],
    "ints": [0, -3, 2**60],
    "name": "w8a8 ✓",
    "flag": True,
    "none": None,
    "numpy": {"f32": np.float32(0.1), "i64": np.int64(7), "arr": np.arange(3, dtype=np.float32) / 3},
    "b": {"a": 1},
}


def test_json_round_trip_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_json(path, values=VALUES, metadata=metadata(), tolerance={"fidelity.sqnr_db": {"atol": 0.1, "rtol": 0.0}})
    stored = read_json(path)
    assert stored.schema_version == SCHEMA_VERSION
    assert stored.metadata == BaselineMetadata.from_dict(json.loads(json.dumps(metadata().to_dict())))
    assert stored.tolerance == {"fidelity.sqnr_db": {"atol": 0.1, "rtol": 0.0}}
    fid = stored.values["fidelity"]
    assert fid == {"sqnr_db": 31.245678901234567, "kl": 1e-310, "third": 1 / 3, "tenth": 0.1}
    nan, inf, ninf, negzero = stored.values["special"]
    assert math.isnan(nan) and inf == math.inf and ninf == -math.inf and math.copysign(1, negzero) == -1
    assert stored.values["ints"] == [0, -3, 2**60]
    assert stored.values["numpy"]["f32"] == float(np.float32(0.1))
    assert stored.values["numpy"]["i64"] == 7
    assert stored.values["numpy"]["arr"] == (np.arange(3, dtype=np.float32) / 3).tolist()
    assert stored.values["name"] == "w8a8 ✓" and stored.values["flag"] is True and stored.values["none"] is None
    text = path.read_text()
    assert text.endswith("}\n") and "NaN" in text and "Infinity" in text
    assert list(json.loads(text)) == ["metadata", "schema_version", "tolerance", "values"]


def test_json_bytes_are_deterministic(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", values=VALUES, metadata=metadata())
    reordered = dict(reversed(list(VALUES.items())))
    write_json(tmp_path / "b.json", values=reordered, metadata=metadata())
    write_json(tmp_path / "a.json", values=VALUES, metadata=metadata())
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_json_rejects_unserializable_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="x.json"):
        write_json(tmp_path / "x.json", values={"a": object()}, metadata=metadata())
    assert not (tmp_path / "x.json").exists()


def test_missing_json_is_missing_baseline(tmp_path: Path) -> None:
    path = tmp_path / "resnet18-none" / "w8a8" / "fidelity.json"
    with pytest.raises(MissingBaseline) as info:
        read_json(path)
    assert isinstance(info.value, BaselineError)
    assert str(path) in str(info.value) and "--eq-update" in str(info.value)
    assert info.value.path == path
    assert "\n" not in str(info.value)


def corrupt_cases(path: Path) -> dict[str, tuple[bytes, str]]:
    write_json(path, values={"a": 1.5}, metadata=metadata())
    good = path.read_bytes()
    document = json.loads(good)
    no_values = {k: v for k, v in document.items() if k != "values"}
    thin_meta = dict(document, metadata={"model": "resnet18"})
    return {
        "truncated": (good[: len(good) // 2], "not valid JSON"),
        "empty": (b"", "not valid JSON"),
        "merge conflict": (b"<<<<<<< HEAD\n" + good, "not valid JSON"),
        "binary": (b"\xff\xfe\x00garbage", "not UTF-8"),
        "list": (b"[1, 2]", "does not hold"),
        "no values": (json.dumps(no_values).encode(), "'values'"),
        "metadata keys": (json.dumps(thin_meta).encode(), "metadata lacks"),
        "schema 2": (json.dumps(dict(document, schema_version=2)).encode(), "schema version 2"),
        "no schema": (json.dumps(document["values"]).encode(), "schema version None"),
    }


@pytest.mark.parametrize(
    "case", ["truncated", "empty", "merge conflict", "binary", "list", "no values", "metadata keys", "schema 2", "no schema"]
)
def test_corrupt_json_is_baseline_error_naming_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / "fidelity.json"
    data, expected = corrupt_cases(path)[case]
    path.write_bytes(data)
    with pytest.raises(BaselineError, match=expected) as info:
        read_json(path)
    assert not isinstance(info.value, MissingBaseline)
    message = str(info.value)
    assert str(path) in message and "--eq-update-baselines" in message and "\n" not in message


def test_json_ignores_unknown_metadata_keys(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_json(path, values={}, metadata=metadata())
    document = json.loads(path.read_text())
    document["metadata"]["future_field"] = "x"
    path.write_text(json.dumps(document))
    assert read_json(path).metadata == read_json(path).metadata


def test_reading_a_directory_is_baseline_error(tmp_path: Path) -> None:
    (tmp_path / "x.json").mkdir()
    with pytest.raises(BaselineError, match="cannot read baseline"):
        read_json(tmp_path / "x.json")


# --- NPZ -----------------------------------------------------------------------------------


def sample_arrays() -> dict[str, np.ndarray]:
    return {
        "counts": np.arange(256, dtype=np.float64) ** 1.5,
        "binned_grads": np.linspace(-1, 1, 17, dtype=np.float32),
        "zero_point": np.array([0, -3, 7], dtype=np.int64),
        "mask": np.array([True, False]),
        "scalar": np.array(3.25),
        "matrix": np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "special": np.array([np.nan, np.inf, -np.inf, -0.0]),
    }


def test_npz_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "histograms" / "a.npz"
    write_npz(path, arrays=sample_arrays(), metadata=metadata(), tolerance={"x": {"atol": 1.0, "rtol": 0.0}})
    stored = read_npz(path)
    assert set(stored.arrays) == set(sample_arrays())
    for name, array in sample_arrays().items():
        assert stored.arrays[name].dtype == array.dtype and stored.arrays[name].shape == array.shape
        np.testing.assert_array_equal(stored.arrays[name], array)
    assert stored.metadata.recipe == {"name": "w8a8", "weight": {"bits": 8, "range": [-128, 127]}}
    assert stored.tolerance == {"x": {"atol": 1.0, "rtol": 0.0}}
    assert stored.schema_version == SCHEMA_VERSION
    with np.load(path, allow_pickle=False) as plain:  # an ordinary npz for numpy too
        assert "counts" in plain.files and "__meta__" in plain.files


def test_npz_bytes_are_deterministic(tmp_path: Path) -> None:
    write_npz(tmp_path / "a.npz", arrays=sample_arrays(), metadata=metadata())
    reordered = dict(reversed(list(sample_arrays().items())))
    write_npz(tmp_path / "b.npz", arrays=reordered, metadata=metadata())
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.npz") as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert [info.filename for info in archive.infolist()] == sorted(info.filename for info in archive.infolist())


def test_npz_refuses_object_arrays_and_reserved_names(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    with pytest.raises(ValueError, match="dtype object"):
        write_npz(path, arrays={"a": np.array([{"x": 1}], dtype=object)}, metadata=metadata())
    with pytest.raises(ValueError, match="__meta__"):
        write_npz(path, arrays={"__meta__": np.zeros(2)}, metadata=metadata())
    with pytest.raises(ValueError, match="non-empty string"):
        write_npz(path, arrays={"": np.zeros(2)}, metadata=metadata())
    assert not path.exists()


def npz_cases(path: Path) -> dict[str, bytes]:
    write_npz(path, arrays=sample_arrays(), metadata=metadata())
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 3] ^= 0xFF
    plain = io.BytesIO()
    np.savez(plain, counts=np.arange(3))
    pickled = io.BytesIO()
    np.savez(pickled, counts=np.array([{"a": 1}], dtype=object), __meta__=np.frombuffer(b"{}", dtype=np.uint8))
    return {
        "truncated": good[: len(good) // 2],
        "tail cut": good[:-10],
        "flipped byte": bytes(flipped),
        "not a zip": b"hello",
        "empty": b"",
        "no meta": plain.getvalue(),
        "pickled object": pickled.getvalue(),
    }


@pytest.mark.parametrize("case", ["truncated", "tail cut", "flipped byte", "not a zip", "empty", "no meta", "pickled object"])
def test_corrupt_npz_is_baseline_error(tmp_path: Path, case: str) -> None:
    path = tmp_path / "hist.npz"
    path.write_bytes(npz_cases(path)[case])
    with pytest.raises(BaselineError) as info:
        read_npz(path)
    assert not isinstance(info.value, MissingBaseline)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    # numpy's own message suggests allow_pickle=True; ours never does.
    assert "allow_pickle" not in str(info.value)
    if case == "pickled object":
        assert "holds pickled Python objects, which pytest-easyquant never writes and does not load" in str(info.value)


def test_npz_schema_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    document = {"schema_version": 99, "metadata": metadata().to_dict(), "tolerance": None}
    np.savez(path, a=np.zeros(2), __meta__=np.frombuffer(json.dumps(document).encode(), dtype=np.uint8))
    with pytest.raises(BaselineError, match="schema version 99"):
        read_npz(path)


def test_missing_npz(tmp_path: Path) -> None:
    with pytest.raises(MissingBaseline, match="x.npz"):
        read_npz(tmp_path / "x.npz")


# --- PNG -----------------------------------------------------------------------------------


def test_png_round_trip_and_determinism(tmp_path: Path) -> None:
    data = png_bytes()
    write_png(tmp_path / "plots" / "a.png", data)
    assert read_png(tmp_path / "plots" / "a.png") == data
    assert png_bytes() == data  # matplotlib renders the same bytes twice (no timestamps)


def test_write_png_refuses_non_png(tmp_path: Path) -> None:
    data = png_bytes()
    for bad in (b"not a png", data[:-12], data[:100]):
        with pytest.raises(ValueError, match="refusing to write"):
            write_png(tmp_path / "x.png", bad)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("case", ["text", "truncated", "no IEND", "corrupt chunk", "empty"])
def test_corrupt_png_is_baseline_error(tmp_path: Path, case: str) -> None:
    data = png_bytes()
    corrupt = bytearray(data)
    corrupt[40] ^= 0xFF
    payload = {
        "text": b"<html>not a png</html>",
        "truncated": data[: len(data) // 2],
        "no IEND": data[:-12],
        "corrupt chunk": bytes(corrupt),
        "empty": b"",
    }[case]
    path = tmp_path / "plot.png"
    path.write_bytes(payload)
    with pytest.raises(BaselineError) as info:
        read_png(path)
    assert not isinstance(info.value, MissingBaseline)
    assert str(path) in str(info.value) and "--eq-update-baselines" in str(info.value)


def test_missing_png(tmp_path: Path) -> None:
    with pytest.raises(MissingBaseline, match="plot.png"):
        read_png(tmp_path / "plot.png")


# --- metadata --------------------------------------------------------------------------------


def test_metadata_current_fills_versions() -> None:
    current = BaselineMetadata.current(
        model="digits", weights="DEFAULT", recipe={"name": "w4a8"}, data="digits", seed=1, calib_batches=3, device="cpu"
    )
    assert current.numpy == np.__version__
    import matplotlib

    assert current.matplotlib == matplotlib.__version__
    assert current.pytest_easyquant != "unknown" and current.torch
    assert current.schema_version == SCHEMA_VERSION
    assert hash(current) == hash(current)  # usable in sets despite the recipe dict


def test_metadata_dict_round_trip() -> None:
    meta = metadata()
    data = meta.to_dict()
    assert BaselineMetadata.from_dict({**data, "unknown": 1}) == meta
    assert set(data) >= {"model", "weights", "recipe", "data", "seed", "calib_batches", "device", "torch", "schema_version"}
    del data["torch"]
    with pytest.raises(ValueError, match="torch"):
        BaselineMetadata.from_dict(data)
    with pytest.raises(ValueError, match="recipe"):
        BaselineMetadata.from_dict({**meta.to_dict(), "recipe": "w8a8"})


def test_metadata_differences() -> None:
    baseline = metadata()
    assert baseline.differences(metadata()) == []
    # tuple vs list (what JSON gives back) is no difference
    assert baseline.differences(metadata(recipe={"name": "w8a8", "weight": {"bits": 8, "range": [-128, 127]}})) == []
    assert baseline.differences(metadata(torch="2.15.0", device="cuda")) == [
        "device: baseline cpu, now cuda",
        "torch: baseline 2.14.1, now 2.15.0",
    ]
    assert baseline.differences(metadata(recipe={"name": "w4a4", "weight": {"bits": 4}})) == ["recipe: baseline w8a8, now w4a4"]
    changed = metadata(recipe={"name": "w8a8", "weight": {"bits": 4, "range": (-128, 127)}, "extra": 1})
    assert baseline.differences(changed) == ["recipe.extra: baseline (absent), now 1", "recipe.weight.bits: baseline 8, now 4"]


def test_metadata_environment_fields_are_compared_only_when_recorded() -> None:
    from matplotlib import ft2font

    now = metadata(platform="Linux-x86_64", python="3.11.7", freetype=ft2font.__freetype_version__, backend="fx")
    older = metadata()  # written before these fields existed
    assert BaselineMetadata.from_dict(older.to_dict() | {"platform": None}).platform is None
    assert older.differences(now) == []
    assert now.differences(metadata(platform="Darwin-arm64", python="3.11.7", freetype="2.6.1", backend="pt2e")) == [
        "platform: baseline Linux-x86_64, now Darwin-arm64",
        f"freetype: baseline {ft2font.__freetype_version__}, now 2.6.1",
        "backend: baseline fx, now pt2e",
    ]
    assert older.rendering_note(now) == ""
    note = metadata(freetype="2.6.1", matplotlib="3.9.0").rendering_note(now)
    assert note.startswith(f"the baseline image was drawn with matplotlib 3.9.0 (now 3.11.2) and FreeType 2.6.1 (now {now.freetype})")



def test_cpu_kernels_follow_the_pins_and_a_difference_gets_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pytest_easyquant import cpu_kernels

    for name in ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR"):
        monkeypatch.delenv(name, raising=False)
    assert cpu_kernels.describe() == torch.backends.cpu.get_cpu_capability()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert cpu_kernels.describe() == f"{torch.backends.cpu.get_cpu_capability()}, oneDNN AVX2, MKL COMPATIBLE"

    now = metadata(cpu="AVX2")
    assert now.differences(metadata(cpu="AVX512")) == ["cpu: baseline AVX2, now AVX512"]
    note = metadata(cpu="AVX512").kernels_note(now)
    assert note.startswith("the baseline was recorded on other CPU kernels (AVX512; now AVX2): their float rounding")
    assert "--eq-pin-kernels; README, 'Baselines across machines'" in note
    assert metadata().kernels_note(now) == ""  # not recorded: nothing to say
    assert metadata(cpu="AVX2").kernels_note(now) == ""
    assert metadata(cpu="AVX512", device="cuda").kernels_note(metadata(cpu="AVX2", device="cuda")) == ""

# --- usage ---------------------------------------------------------------------------------


def test_usage_tracker_reports_unused_files(tmp_path: Path) -> None:
    suite = tmp_path / "resnet18-none" / "w8a8"
    other = tmp_path / "digits-none" / "w8a8"
    files = {
        name: suite / name
        for name in ["fidelity.json", "accuracy.json", "qparams/a.json", "qparams/b.json", "histograms/x.npz", "plots/p.png", "plots/q.png"]
    }
    extras = [suite / "metadata.json", suite / ".fidelity.json.abc.tmp", suite / "README.md", suite / ".hidden" / "z.json", other / "x.json"]
    for path in [*files.values(), *extras]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    tracker = UsageTracker()
    tracker.mark(files["fidelity.json"])
    tracker.mark(suite / "qparams" / ".." / "qparams" / "a.json")  # the same file, spelled differently
    tracker.mark(suite / "never-written.json")
    expected = {files["plots/p.png"]}  # a deselected item's file: not unused
    assert tracker.unused([suite, suite, tmp_path / "absent"], expected) == sorted(
        [files["accuracy.json"], files["qparams/b.json"], files["histograms/x.npz"], files["plots/q.png"]]
    )
    assert tracker.unused([other], set()) == [other / "x.json"]
    assert tracker.unused([], set()) == []


def test_plots_metadata_sidecar_is_unused_only_with_no_known_plot(tmp_path: Path) -> None:
    directory = tmp_path / "tiny-none" / "w8a8"
    for name in ("metadata.json", "plots/p.png", "fidelity.json"):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(b"x")
    tracker = UsageTracker()
    tracker.mark(directory / "fidelity.json")
    # A plot that is known (used, deselected or switched off) keeps the sidecar.
    assert tracker.unused([directory], {directory / "plots/p.png"}) == []
    # Nothing knows the plots any more: the sidecar goes with them.
    assert tracker.unused([directory], set()) == [directory / "metadata.json", directory / "plots/p.png"]


def test_errors_pickle_with_their_path(tmp_path: Path) -> None:
    for cls in (BaselineError, MissingBaseline):
        error = cls("no baseline at x", path=tmp_path / "x.json")
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is cls and str(copy) == str(error) and copy.path == error.path
