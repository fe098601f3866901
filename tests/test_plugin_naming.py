"""Names -> baseline paths: safe components, no escape from the baseline directory, no collisions."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from pytest_easyquant.naming import baseline_dir, baseline_file, is_weights_path, sanitize, weights_label

SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
TRICKY = [
    "",
    ".",
    "..",
    "...",
    "../../etc/passwd",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "C:\\x",
    "C:",
    ".hidden",
    "-rf",
    "--",
    "a b",
    "a  b",
    "a-b",
    "a--b",
    "test_x[param-1]",
    "test_x[param/1]",
    "Grüße",
    "模型",
    "emoji 🙂",
    "CON",
    "nul.json",
    "trailing.",
    "x" * 100,
    "x" * 110,
    "x" * 111,
    "y" * 500,
    "tab\there",
    "new\nline",
    "nul\x00byte",
]


def sha8(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


@pytest.mark.parametrize("name", ["resnet18", "w8a8", "layer1.0.conv1.weight_fake_quant", "ResNet18_Weights.IMAGENET1K_V1", "a-b_c.d", "x" * 110])
def test_safe_names_are_kept(name: str) -> None:
    assert sanitize(name) == name


@pytest.mark.parametrize("name", TRICKY)
def test_sanitized_component_is_safe(name: str) -> None:
    out = sanitize(name)
    assert SAFE.match(out), out
    assert out.isascii()
    assert out not in (".", "..")
    assert "/" not in out and "\\" not in out and ":" not in out
    assert 0 < len(out) <= 110
    assert "--" not in out


@pytest.mark.parametrize("name", TRICKY)
def test_changed_names_carry_the_hash_of_the_original(name: str) -> None:
    out = sanitize(name)
    if out != name:
        assert out.endswith("-" + hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8])


def test_examples() -> None:
    assert sanitize("a b") == f"a-b-{sha8('a b')}"
    assert sanitize("../../etc/passwd") == f"etc-passwd-{sha8('../../etc/passwd')}"
    drive = "C:\\x"
    assert sanitize(drive) == f"C-x-{sha8(drive)}"
    assert sanitize("") == f"_-{sha8('')}"
    assert sanitize("..") == f"_-{sha8('..')}"
    assert sanitize("test_x[param-1]") == f"test_x-param-1-{sha8('test_x[param-1]')}"
    assert sanitize("CON") == f"_CON-{sha8('CON')}"
    assert sanitize("nul.json") == f"_nul.json-{sha8('nul.json')}"


def test_long_names_are_cut_and_hashed() -> None:
    long = "y" * 500
    out = sanitize(long)
    assert out == "y" * 100 + "-" + sha8(long)
    assert sanitize("y" * 501) != out


def test_no_collisions_between_different_inputs() -> None:
    inputs = set(TRICKY) | {"a:b", "a/b", "a\\b", "a b", "a?b", "a*b", "a-b", "A b", "y" * 501, "y" * 502, "Grüsse"}
    outputs = {sanitize(name) for name in inputs}
    assert len(outputs) == len(inputs)


@pytest.mark.parametrize("name", TRICKY)
def test_idempotent(name: str) -> None:
    once = sanitize(name)
    assert sanitize(once) == once


def test_weights_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert weights_label("none") == "none"
    assert weights_label("DEFAULT") == "DEFAULT"
    assert weights_label("ResNet18_Weights.IMAGENET1K_V1") == "ResNet18_Weights.IMAGENET1K_V1"
    assert weights_label("IMAGENET1K_V1") == "IMAGENET1K_V1"
    assert not is_weights_path("IMAGENET1K_V1")
    assert is_weights_path("model.pt") and is_weights_path("ckpt/model") and is_weights_path("my weights")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "my model.pt").write_bytes(b"x")
    label = weights_label("ckpt/my model.pt")
    assert label == f"{sanitize('my model')}-{sha8('ckpt/my model.pt')}"
    assert SAFE.match(label)
    # the same file named differently (relative, absolute, with ./ and ..) gives the same label
    assert weights_label("./ckpt/my model.pt") == label
    assert weights_label(str(tmp_path / "ckpt" / "my model.pt")) == label
    assert weights_label("ckpt/../ckpt/my model.pt") == label
    # another file with the same stem does not
    (tmp_path / "other").mkdir()
    assert weights_label("other/my model.pt") != label
    # outside the root the resolved absolute path is hashed
    outside = weights_label("ckpt/my model.pt", root=tmp_path / "other")
    assert outside == f"{sanitize('my model')}-{sha8((tmp_path / 'ckpt' / 'my model.pt').resolve().as_posix())}"


def test_baseline_dir(tmp_path: Path) -> None:
    directory = baseline_dir(tmp_path, model="resnet18", weights="none", recipe="w8a8")
    assert directory == tmp_path / "resnet18-none" / "w8a8"
    evil = baseline_dir(tmp_path, model="../../x", weights="../y.pt", recipe="../../z")
    assert evil.parent.parent == tmp_path
    assert all(SAFE.match(part) for part in evil.relative_to(tmp_path).parts)


def test_baseline_file_subfolders(tmp_path: Path) -> None:
    path = baseline_file(tmp_path, "qparams/layer1.0.conv1.weight_fake_quant", ".json")
    assert path == tmp_path / "qparams" / "layer1.0.conv1.weight_fake_quant.json"
    assert baseline_file(tmp_path, "fidelity", ".json") == tmp_path / "fidelity.json"
    assert baseline_file(tmp_path, "plots/act sa", ".png") == tmp_path / "plots" / f"act-sa-{sha8('act sa')}.png"


@pytest.mark.parametrize("check", ["../../etc/passwd", "/etc/passwd", "..", "a/../../b", "C:\\x", "a//b", "./.hidden", "..\\..\\x"])
def test_baseline_file_stays_inside(tmp_path: Path, check: str) -> None:
    directory = tmp_path / "base"
    path = baseline_file(directory, check, ".npz")
    assert directory.resolve() in path.resolve().parents
    assert not any(part.startswith(".") for part in path.relative_to(directory).parts)


def test_baseline_file_rejects_empty_and_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty check name"):
        baseline_file(tmp_path, "", ".json")
    with pytest.raises(ValueError, match="empty check name"):
        baseline_file(tmp_path, "///", ".json")
    for suffix in ("json", "/../x", ".a/b", ""):
        with pytest.raises(ValueError, match="suffix"):
            baseline_file(tmp_path, "x", suffix)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_baseline_file_refuses_symlinked_escape(tmp_path: Path) -> None:
    directory = tmp_path / "base"
    directory.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (directory / "qparams").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the baseline directory"):
        baseline_file(directory, "qparams/x", ".json")
