"""Float model -> calibrated fake-quant model, the CLE tutorial's workflow as one call.

trace (torch.fx) -> fold BatchNorm into the preceding layers -> optional cross-layer
equalization -> torch.ao ``prepare_qat_fx`` with a recipe's eqcore quantizers. These are the
backend-neutral entry points; the FX-specific steps (tracing, ``prepare_qat_fx``) are in
`eqcore.prepare.fx`, and ``calibrate`` is in `eqcore.prepare.calibrate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from eqcore._torch_ao import FakeQuantizeBase
from eqcore.errors import EQError
from eqcore.prepare.bias_absorption import absorb_high_bias
from eqcore.prepare.cle import equalize
from eqcore.prepare.cle_pairs import CLEPairs, find_cle_pairs
from eqcore.prepare.fusion import float_convbn_to_conv
from eqcore.prepare.fx import insert_quantizers, trace
from eqcore.quant.recipes import Recipe, get_recipe
from eqcore.quant.toggles import disable_param_learning, enable_fake_quant, enable_PTQ_observer


@dataclass
class PreparedModel:
    """A fake-quant model with the float model it was prepared from.

    ``float_model`` is the traced, BN-folded (and, with CLE, equalized) float model: module names
    match ``model``'s, so it is the right reference for per-layer fidelity.
    """

    model: fx.GraphModule
    float_model: fx.GraphModule
    recipe: Recipe
    cle_pairs: CLEPairs | None

    @property
    def quantizers(self) -> dict[str, FakeQuantizeBase]:
        return fake_quant_modules(self.model)


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantizeBase]:
    """Every fake-quant module of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizeBase)}


def prepare(
    model: nn.Module,
    recipe: str | Recipe,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    fuse_bn: bool = True,
    cle: bool = False,
    cle_threshold: float = 1e-4,
    high_bias_absorption: bool = False,
) -> PreparedModel:
    """Trace, fold BN, optionally equalize, and insert the recipe's fake quantizers.

    ``high_bias_absorption`` (after CLE when both are on, as in DFQ) moves large positive
    biases of the CLE pairs' first layers into the next layer (:func:`absorb_high_bias`,
    which needs ``fuse_bn``); ``float_model`` is then the absorbed float model.
    The input model is not modified. The result is in eval mode with fake quantization and the
    observers enabled, ready for :func:`calibrate`.
    """
    recipe = get_recipe(recipe)
    float_model = trace(model).eval()
    if fuse_bn:
        float_model = float_convbn_to_conv(float_model, inplace=True)
    pairs = None
    if cle:
        pairs = find_cle_pairs(float_model)
        float_model = equalize(float_model, pairs, threshold=cle_threshold, inplace=True)
    if high_bias_absorption:
        if not fuse_bn:
            raise ValueError("high_bias_absorption needs fuse_bn=True: it uses the folded BatchNorms' statistics")
        pairs = pairs if pairs is not None else find_cle_pairs(float_model)
        float_model = absorb_high_bias(float_model, pairs, inplace=True)[0]
    quant_model = insert_quantizers(float_model, recipe, example_inputs)
    quant_model.eval()
    if not fake_quant_modules(quant_model):
        raise EQError(
            f"{type(model).__name__} has no layer the recipe {recipe.name!r} quantizes "
            f"(it quantizes {', '.join(t.__name__ for t in recipe.layer_types)})"
        )
    quant_model.apply(enable_fake_quant)
    quant_model.apply(enable_PTQ_observer)
    quant_model.apply(disable_param_learning)  # static estimate: the observers set the qparams
    return PreparedModel(model=quant_model, float_model=float_model, recipe=recipe, cle_pairs=pairs)


def prepare_model(
    model: nn.Module,
    recipe: str | Recipe,
    example_inputs: tuple[torch.Tensor, ...],
    fuse_bn: bool = True,
    cle: bool = False,
    **kwargs: object,
) -> fx.GraphModule:
    """The fake-quant model of :func:`prepare` (see there)."""
    return prepare(model, recipe, example_inputs, fuse_bn=fuse_bn, cle=cle, **kwargs).model

