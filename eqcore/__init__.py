"""eqcore: fast learnable fake quantization and quantization analysis for PyTorch.

Public names are imported lazily, so ``import eqcore`` stays cheap and each module
(quantizers, hooks, plots, ...) can be imported on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # quantizers
    "EQLearnableFakeQuantize": "quant.modules",
    "EQFakeQuantize": "quant.modules",
    "fake_quantize": "quant.functional",
    "learnable_fake_quantize": "quant.functional",
    "release_buffers": "quant.pool",
    # observers
    "PercentileObserver": "quant.observers",
    "MSEObserver": "quant.observers",
    "KLObserver": "quant.observers",
    # toggles
    "enable_fake_quant": "quant.toggles",
    "disable_fake_quant": "quant.toggles",
    "enable_PTQ_observer": "quant.toggles",
    "disable_PTQ_observer": "quant.toggles",
    "enable_param_learning": "quant.toggles",
    # recipes and preparation
    "Recipe": "quant.recipes",
    "get_recipe": "quant.recipes",
    "RECIPES": "quant.recipes",
    "learnable_act": "quant.recipes",
    "learnable_weights": "quant.recipes",
    "fake_quant_act": "quant.recipes",
    "fake_quant_weight": "quant.recipes",
    "prepare_model": "prepare.quantize",
    "calibrate": "prepare.calibrate",
    # fusion and CLE
    "float_convbn_to_conv": "prepare.fusion",
    "qat_convbn_to_conv": "prepare.fusion",
    "convbn_to_conv": "prepare.fusion",
    "get_previous_module_node": "prepare.cle_pairs",
    "find_cle_pairs": "prepare.cle_pairs",
    "equalize": "prepare.cle",
    "absorb_high_bias": "prepare.bias_absorption",
    "relu6_to_relu": "prepare.cle",
    "CLEPairs": "prepare.cle_pairs",
    "SkippedPair": "prepare.cle_pairs",
    # histograms, hooks and SA
    "ActHistogram": "analysis.hooks",
    "add_activation_forward_hooks": "analysis.hooks",
    "add_sensitivity_analysis_hooks": "analysis.sa_hooks",
    "run_sensitivity_analysis": "analysis.sa_run",
    "forward_and_backprop_an_image": "analysis.prop_data",
    # plots
    "plot_quant_act_hist": "plots.api",
    "plot_quant_weight_hist": "plots.api",
    "plot_quant_act_SA_hist": "plots.api",
    "per_channel_boxplots": "plots.boxplots",
    "HistogramView": "plots.view",
    "render_act_hist": "plots.render",
    "render_weight_hist": "plots.render",
    "render_sa_hist": "plots.render",
    "render_many": "plots.jobs",
    "save_figure": "plots.png",
    "figure_to_png": "plots.png",
    # evaluation and metrics
    "evaluate": "analysis.evaluate",
    "sqnr": "analysis.metrics",
    "cosine_similarity": "analysis.metrics",
    "top1_agreement": "analysis.metrics",
    "topk_accuracy": "analysis.metrics",
    "kl_divergence": "analysis.metrics",
    "fidelity": "analysis.metrics",
    "per_layer_sqnr": "analysis.evaluate",
    "collect_logits": "analysis.evaluate",
    "evaluate_dataset": "analysis.evaluate",
    # per-layer sensitivity and mixed precision
    "per_layer_sensitivity": "analysis.sensitivity",
    "SensitivityReport": "analysis.sensitivity",
    "LayerSensitivity": "analysis.sensitivity",
    "find_quantized_layers": "analysis.layers",
    "QuantizedLayer": "analysis.layers",
    "suggest_mixed_precision": "analysis.mixed_precision",
    "MixedPrecisionTarget": "analysis.mixed_precision",
    "MixedPrecisionSuggestion": "analysis.mixed_precision",
    "MixedRecipe": "quant.mixed_recipe",
    "mixed_recipe": "quant.mixed_recipe",
    "render_sensitivity": "plots.sensitivity",
    # errors
    "EQError": "errors",
    # models and data
    "get_model": "models.zoo",
    "available_models": "models.zoo",
    "ZooModel": "models.zoo",
    "InputSpec": "models.specs",
    "get_loaders": "models.loaders",
    "sample_images": "models.samples",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'eqcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"eqcore.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
