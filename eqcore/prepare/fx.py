"""FX backend of preparation: torch.fx tracing and torch.ao ``prepare_qat_fx``.

What is specific to the FX graph mode of torch.ao lives here: tracing the float model with
torch.fx, and inserting a recipe's eqcore quantizers with ``prepare_qat_fx``. The
backend-neutral entry points (`eqcore.prepare.quantize.prepare`) call these.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn

from eqcore._torch_ao import prepare_qat_fx
from eqcore.errors import EQError
from eqcore.quant.recipes import Recipe


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with an error that says what to do when tracing fails."""
    if isinstance(model, fx.GraphModule):
        return copy.deepcopy(model)
    try:
        return fx.symbolic_trace(copy.deepcopy(model))
    except Exception as exc:  # tracing raises many types; all mean the same to the user
        raise EQError(
            f"{type(model).__name__} is not FX-traceable ({type(exc).__name__}: {exc}); "
            "make its forward free of data-dependent control flow, or wrap the untraceable "
            "part with torch.fx.wrap"
        ) from exc


def insert_quantizers(
    float_model: fx.GraphModule, recipe: Recipe, example_inputs: tuple[torch.Tensor, ...]
) -> fx.GraphModule:
    """``prepare_qat_fx`` on a copy of ``float_model`` with the recipe's qconfig mapping."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        quant_model = prepare_qat_fx(
            copy.deepcopy(float_model), recipe.qconfig_mapping(float_model), example_inputs
        )
    return quant_model
