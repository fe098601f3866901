"""The two tutorials under docs/tutorials run end to end, offline, and write what they promise.

Each runs in its own Python process through docs/tutorials/run_tutorial.py, as a user would run
it, with TMPDIR pointed at the test's tmp_path, so the temporary directory the tutorial moves into
(and writes its plots under) is inside it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "docs" / "tutorials"

# The original notebooks' outputs (docs/tutorials/*.md's sources), not ours.
SEED_CLE_PAIRS = [
    [f"layer{layer}.{block}.conv1", f"layer{layer}.{block}.conv2"] for layer in (1, 2, 3, 4) for block in (0, 1)
]
SEED_SA_HOOKED = ["activation_post_process_1"] + [f"activation_post_process_{i}" for i in range(10, 20)] + [
    "activation_post_process_21"
]


def resnet18_convs() -> list[str]:
    """The modules the tutorials' qconfig loop quantizes (those with ``out_channels``)."""
    return [name for name, module in torchvision.models.resnet18().named_modules() if isinstance(module, nn.Conv2d)]


def run_tutorial(name: str, tmp_path: Path) -> tuple[str, Path]:
    """Run a tutorial; return its stdout and the temporary directory it wrote into."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "MPLBACKEND": "Agg"}
    process = subprocess.run(
        [sys.executable, str(TUTORIALS / "run_tutorial.py"), str(TUTORIALS / name)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert process.returncode == 0, f"{name} failed:\n{process.stdout[-3000:]}\n{process.stderr[-6000:]}"
    (workdir,) = [path for path in tmp_path.iterdir() if path.is_dir() and path.name.startswith("eq-")]
    assert f"Plots go to {workdir}" in process.stdout
    return process.stdout, workdir


def pngs(folder: Path) -> dict[str, Path]:
    return {path.name: path for path in folder.glob("*.png")}


def assert_drawn(path: Path) -> None:
    """A readable PNG with something drawn on it (not one flat colour)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200, path
    assert pixels.std() > 5, f"{path} looks blank"


def out_after(stdout: str, cell: int) -> str:
    """What cell ``cell`` printed (the runner prints ``In [n]:`` before each cell)."""
    return stdout.split(f"In [{cell}]:\n", 1)[1].split("\nIn [", 1)[0]


@pytest.mark.slow
def test_sa_tutorial_runs_and_writes_its_plots(tmp_path: Path) -> None:
    stdout, workdir = run_tutorial("sa_plots.md", tmp_path)
    plots = workdir / "Histogram_plots"
    hooked = [line.removeprefix("Adding hook to ") for line in stdout.splitlines() if line.startswith("Adding hook to ")]
    assert hooked == SEED_SA_HOOKED * 2  # the SA hooks, then the forward-only hooks
    assert "BackpropResult(sample='chelsea'" in stdout  # the built-in photo of an animal
    assert "Evaluation:" in stdout

    sa = pngs(plots / "activations" / "sensitivity_analysis")
    forward = pngs(plots / "activations" / "hists")
    assert sorted(sa) == sorted(f"SA-Act-hist-{name}.png" for name in SEED_SA_HOOKED)
    assert sorted(forward) == sorted(f"Act-hist-{name}.png" for name in SEED_SA_HOOKED)
    weight_names = sorted(f"Weight-hist-{name.replace('.', '-')}.png" for name in resnet18_convs())
    assert len(weight_names) == 20
    weights = pngs(plots / "weights" / "hists")
    weights_sa = pngs(plots / "weights" / "sensitivity_analysis")
    assert sorted(weights) == weight_names and sorted(weights_sa) == weight_names
    for path in (sa["SA-Act-hist-activation_post_process_21.png"], forward["Act-hist-activation_post_process_1.png"],
                 weights["Weight-hist-layer4-0-conv2.png"], weights_sa["Weight-hist-layer4-0-conv2.png"]):
        assert_drawn(path)
    # The SA weight plot carries the gradient panel the plain one does not: the images differ.
    assert weights["Weight-hist-conv1.png"].read_bytes() != weights_sa["Weight-hist-conv1.png"].read_bytes()


@pytest.mark.slow
def test_cle_tutorial_runs_and_writes_its_plots(tmp_path: Path) -> None:
    stdout, workdir = run_tutorial("cle.md", tmp_path)
    pairs = ast.literal_eval(out_after(stdout, 5).strip())
    assert pairs == SEED_CLE_PAIRS
    assert out_after(stdout, 6).split()[:5] == ["opcode", "name", "target", "args", "kwargs"]
    assert "Evaluating a cat" in stdout and stdout.count("Evaluation:") == 5

    boxes = workdir / "Box_plots"
    with_cle, without_cle = boxes / "With_CLE" / "layer2.0.conv1.png", boxes / "Without_CLE" / "layer2.0.conv1.png"
    assert_drawn(with_cle)
    assert_drawn(without_cle)
    assert with_cle.read_bytes() != without_cle.read_bytes()

    weight_names = sorted(f"Weight-hist-{name}.png" for name in resnet18_convs())
    hooked = [line.removeprefix("Adding hook to ") for line in stdout.splitlines() if line.startswith("Adding hook to ")]
    for title in ("FX, with CLE", "FX, no CLE"):
        plots = workdir / "Histogram_plots" / title
        act_sa = pngs(plots / "activations" / "sensitivity_analysis")
        assert len(act_sa) >= 20
        assert set(act_sa) <= {f"SA-Act-hist-{name}.png" for name in hooked}
        assert sorted(pngs(plots / "weights" / "sensitivity_analysis")) == weight_names
        assert_drawn(plots / "weights" / "sensitivity_analysis" / "Weight-hist-layer1.0.conv2.png")
        assert_drawn(sorted(act_sa.values())[0])
    assert "After CLE:\nlayer2.0.conv1.weight_fake_quant scale: Parameter containing:" in stdout
