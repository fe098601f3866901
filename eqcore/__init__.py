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
    "EQLearnableFakeQuantize": "quantizers",
    "EQFakeQuantize": "quantizers",
    "fake_quantize": "quantizers",
    "learnable_fake_quantize": "quantizers",
    "release_buffers": "quantizers",
    # observers
    "PercentileObserver": "observers",
    "MSEObserver": "observers",
    "KLObserver": "observers",
    # toggles
    "enable_fake_quant": "toggles",
    "disable_fake_quant": "toggles",
    "enable_PTQ_observer": "toggles",
    "disable_PTQ_observer": "toggles",
    "enable_param_learning": "toggles",
    # recipes and preparation
    "Recipe": "qconfigs",
    "get_recipe": "qconfigs",
    "RECIPES": "qconfigs",
    "prepare_model": "prepare",
    "calibrate": "prepare",
    # fusion and CLE
    "float_convbn_to_conv": "fusion",
    "qat_convbn_to_conv": "fusion",
    "convbn_to_conv": "fusion",
    "get_previous_module_node": "cle",
    "find_cle_pairs": "cle",
    "equalize": "cle",
    "absorb_high_bias": "cle",
    "relu6_to_relu": "cle",
    "CLEPairs": "cle",
    "SkippedPair": "cle",
    # histograms, hooks and SA
    "ActHistogram": "hooks",
    "add_activation_forward_hooks": "hooks",
    "add_sensitivity_analysis_hooks": "hooks",
    "run_sensitivity_analysis": "hooks",
    # plots
    "plot_quant_act_hist": "plots",
    "plot_quant_weight_hist": "plots",
    "plot_quant_act_SA_hist": "plots",
    "per_channel_boxplots": "plots",
    "HistogramView": "plots",
    "render_act_hist": "plots",
    "render_weight_hist": "plots",
    "render_sa_hist": "plots",
    "render_many": "plots",
    "save_figure": "plots",
    "figure_to_png": "plots",
    # evaluation and metrics
    "evaluate": "metrics",
    "sqnr": "metrics",
    "cosine_similarity": "metrics",
    "top1_agreement": "metrics",
    "topk_accuracy": "metrics",
    "kl_divergence": "metrics",
    "fidelity": "metrics",
    "per_layer_sqnr": "metrics",
    "collect_logits": "metrics",
    "evaluate_dataset": "metrics",
    # errors
    "EQError": "errors",
    # models and data
    "get_model": "zoo",
    "available_models": "zoo",
    "ZooModel": "zoo",
    "InputSpec": "data",
    "get_loaders": "data",
    "sample_images": "data",
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
