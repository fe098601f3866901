"""The shape of the code: no import circles, layers import downwards, small modules, stable API."""

from __future__ import annotations

import ast
import importlib
import textwrap
from pathlib import Path

import pytest

from import_graph import Graph, build_graph, find_cycles

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("eqcore", "pytest_easyquant")

# eqcore's layers, lowest first (docs/architecture.md): a module imports its own layer or lower ones.
LAYERS = {
    "eqcore.errors": 0,
    "eqcore._torch_ao": 0,
    "eqcore._torchao": 0,
    "eqcore.testing": 0,
    "eqcore.quant": 1,
    "eqcore.models": 2,
    "eqcore.prepare": 3,
    "eqcore.analysis": 4,
    "eqcore.plots": 5,
}
MAX_MODULE_LINES = 500

# The public API that README.md and DESIGN.md name, importable from the package itself.
EQCORE_API = [
    "EQLearnableFakeQuantize", "EQFakeQuantize", "fake_quantize", "learnable_fake_quantize",
    "release_buffers", "PercentileObserver", "MSEObserver", "KLObserver",
    "enable_fake_quant", "disable_fake_quant", "enable_PTQ_observer", "disable_PTQ_observer",
    "enable_param_learning", "Recipe", "get_recipe", "RECIPES", "prepare_model", "calibrate",
    "float_convbn_to_conv", "qat_convbn_to_conv", "convbn_to_conv", "get_previous_module_node",
    "find_cle_pairs", "equalize", "absorb_high_bias", "relu6_to_relu", "CLEPairs", "SkippedPair",
    "ActHistogram", "add_activation_forward_hooks", "add_sensitivity_analysis_hooks",
    "run_sensitivity_analysis", "plot_quant_act_hist", "plot_quant_weight_hist",
    "plot_quant_act_SA_hist", "per_channel_boxplots", "HistogramView", "render_act_hist",
    "render_weight_hist", "render_sa_hist", "render_many", "save_figure", "figure_to_png",
    "evaluate", "sqnr", "cosine_similarity", "top1_agreement", "topk_accuracy", "kl_divergence",
    "fidelity", "per_layer_sqnr", "collect_logits", "evaluate_dataset", "EQError", "get_model",
    "available_models", "ZooModel", "InputSpec", "get_loaders", "sample_images",
    "learnable_act", "learnable_weights", "fake_quant_act", "fake_quant_weight",
    "forward_and_backprop_an_image",
    "per_layer_sensitivity", "SensitivityReport", "LayerSensitivity", "find_quantized_layers",
    "QuantizedLayer", "suggest_mixed_precision", "MixedPrecisionTarget", "MixedPrecisionSuggestion",
    "MixedRecipe", "mixed_recipe", "render_sensitivity",
]
STRATEGIES_API = ["FakeQuantCase", "QParams", "fake_quant_cases", "grid_values", "qparams", "quant_ranges", "shapes"]


@pytest.fixture(scope="module")
def graph() -> Graph:
    return build_graph(ROOT, PACKAGES)


def _layer(module: str) -> int | None:
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def test_no_import_circles(graph: Graph) -> None:
    cycles = find_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_eqcore_layers_import_only_downwards(graph: Graph) -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in graph.edges.items()
        if _layer(module) is not None
        for target in sorted(targets)
        if target.startswith("pytest_easyquant") or (_layer(target) or 0) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_every_eqcore_module_has_a_layer(graph: Graph) -> None:
    unplaced = [m for m in graph.files if m.startswith("eqcore.") and _layer(m) is None]
    assert not unplaced, f"modules outside LAYERS (add them to docs/architecture.md and LAYERS): {unplaced}"


def test_eqcore_never_imports_pytest(graph: Graph) -> None:
    offending = []
    for module, path in graph.files.items():
        if not module.startswith("eqcore"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offending += [f"{module}: {n}" for n in names if n.split(".")[0] in ("pytest", "_pytest", "pytest_easyquant")]
    assert not offending, offending


def test_modules_stay_small(graph: Graph) -> None:
    sizes = {module: len(path.read_text(encoding="utf-8").splitlines()) for module, path in graph.files.items()}
    too_long = {module: lines for module, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


@pytest.mark.parametrize("name", EQCORE_API)
def test_public_names_import_from_eqcore(name: str) -> None:
    import eqcore

    assert name in eqcore.__all__
    assert getattr(eqcore, name) is not None
    assert name in dir(eqcore)


def test_every_lazy_export_resolves() -> None:
    import eqcore

    missing = []
    for name in eqcore.__all__:
        try:
            getattr(eqcore, name)
        except (AttributeError, ImportError) as error:
            missing.append(f"{name}: {error}")
    assert not missing, missing


def test_strategies_api() -> None:
    strategies = importlib.import_module("pytest_easyquant.strategies")
    assert sorted(strategies.__all__) == sorted(STRATEGIES_API)
    for name in STRATEGIES_API:
        assert callable(getattr(strategies, name))


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")


def test_cycle_detector_sees_circles_however_they_are_hidden(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": '_EXPORTS = {"Thing": "deep.thing"}\n',
        "pkg/deep/__init__.py": "",
        "pkg/deep/thing.py": "from ..top import helper\nThing = 1\n",
        "pkg/top.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from pkg.late import Late
            def helper():
                return 1
        """,
        "pkg/late.py": """
            def make():
                from pkg import Thing
                return Thing
        """,
        "pkg/clean.py": "import pkg.top\n",
    })
    graph = build_graph(tmp_path, ("pkg",))
    assert graph.edges["pkg.late"] == {"pkg.deep.thing"}  # through the lazy export table
    assert graph.edges["pkg.deep.thing"] == {"pkg.top"}  # a relative import
    assert graph.edges["pkg.top"] == {"pkg.late"}  # under TYPE_CHECKING
    cycles = find_cycles(graph)
    assert len(cycles) == 1
    cycle = cycles[0]
    assert cycle[0] == cycle[-1] and set(cycle) == {"pkg.deep.thing", "pkg.late", "pkg.top"}
    assert "pkg.clean" not in cycle


def test_cycle_detector_passes_a_tree_without_circles(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "X = 1\n",
        "pkg/mid.py": "from pkg.low import X\n",
        "pkg/high.py": "from pkg import low, mid\nimport pkg.mid\n",
    })
    graph = build_graph(tmp_path, ("pkg",))
    assert graph.edges["pkg.high"] == {"pkg.low", "pkg.mid"}
    assert find_cycles(graph) == []
