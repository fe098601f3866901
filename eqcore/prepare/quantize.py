"""Float model -> calibrated fake-quant model, the CLE tutorial's workflow as one call.

capture -> fold BatchNorm into the preceding layers -> optional cross-layer equalization ->
insert a recipe's eqcore quantizers. Two backends capture and insert: ``"fx"`` (torch.fx
tracing and torch.ao ``prepare_qat_fx``, `eqcore.prepare.fx`) and ``"pt2e"`` (torch.export and
torchao ``prepare_qat_pt2e``, `eqcore.prepare.pt2e`); ``"auto"`` takes FX when the model
traces and PT2E otherwise. These entry points are backend-neutral; ``calibrate`` is in
`eqcore.prepare.calibrate`.
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
from eqcore.prepare import fx as fx_backend
from eqcore.quant.recipes import Recipe, get_recipe
from eqcore.quant.toggles import disable_param_learning, enable_fake_quant, enable_PTQ_observer


@dataclass
class PreparedModel:
    """A fake-quant model with the float model it was prepared from.

    ``float_model`` is the captured, BN-folded (and, with CLE, equalized) float model: module
    names match ``model``'s, so it is the right reference for per-layer fidelity. ``backend`` is
    the backend that prepared it ("fx" or "pt2e"); ``backend_note`` says why (for "auto").
    """

    model: fx.GraphModule
    float_model: fx.GraphModule
    recipe: Recipe
    cle_pairs: CLEPairs | None
    backend: str = "fx"
    backend_note: str = ""

    @property
    def quantizers(self) -> dict[str, FakeQuantizeBase]:
        return fake_quant_modules(self.model)


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantizeBase]:
    """Every fake-quant module of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizeBase)}


BACKENDS = ("auto", "fx", "pt2e")


def _capture(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...], backend: str
) -> tuple[str, fx.GraphModule, str]:
    """(backend taken, captured float model, why) for ``backend`` "auto", "fx" or "pt2e"."""
    if backend not in BACKENDS:
        raise EQError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    name = type(model).__name__
    if backend == "fx":
        return "fx", fx_backend.trace(model), "backend fx was asked for"
    from eqcore.prepare import pt2e

    if backend == "pt2e":
        return "pt2e", pt2e.capture(model, example_inputs), "backend pt2e was asked for"
    from eqcore.prepare.export_graph import failure_reason

    try:
        return "fx", fx_backend.trace(model), f"auto: {name} traces with torch.fx"
    except EQError as fx_error:
        reason = failure_reason(fx_error.__cause__ or fx_error)
    try:
        captured = pt2e.capture(model, example_inputs)
    except EQError as export_error:
        raise EQError(
            f"{name} can be captured neither by torch.fx ({reason}) nor by torch.export "
            f"({failure_reason(export_error.__cause__ or export_error)}); make its forward traceable: "
            "move data-dependent Python control flow out of forward (torch.cond for branches on values)"
        ) from export_error
    return "pt2e", captured, f"auto: {name} does not trace with torch.fx ({reason}), so torch.export + PT2E"


def prepare(
    model: nn.Module,
    recipe: str | Recipe,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    backend: str = "auto",
    fuse_bn: bool = True,
    cle: bool = False,
    cle_threshold: float = 1e-4,
    high_bias_absorption: bool = False,
) -> PreparedModel:
    """Capture, fold BN, optionally equalize, and insert the recipe's fake quantizers.

    ``backend``: "fx" (torch.fx + torch.ao), "pt2e" (torch.export + torchao) or "auto" (FX when
    the model traces, else PT2E; ``PreparedModel.backend_note`` says which and why).

    ``high_bias_absorption`` (after CLE when both are on, as in DFQ) moves large positive
    biases of the CLE pairs' first layers into the next layer (:func:`absorb_high_bias`,
    which needs ``fuse_bn``); ``float_model`` is then the absorbed float model.
    The input model is not modified. The result is in eval mode with fake quantization and the
    observers enabled, ready for :func:`calibrate`.
    """
    recipe = get_recipe(recipe)
    taken, float_model, note = _capture(model, example_inputs, backend)
    float_model.eval()
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
    insert = fx_backend.insert_quantizers if taken == "fx" else _pt2e_insert
    quant_model = insert(float_model, recipe, example_inputs)
    quant_model.eval()
    if not fake_quant_modules(quant_model):
        raise EQError(
            f"{type(model).__name__} has no layer the recipe {recipe.name!r} quantizes "
            f"(it quantizes {', '.join(t.__name__ for t in recipe.layer_types)})"
        )
    quant_model.apply(enable_fake_quant)
    quant_model.apply(enable_PTQ_observer)
    quant_model.apply(disable_param_learning)  # static estimate: the observers set the qparams
    return PreparedModel(
        model=quant_model, float_model=float_model, recipe=recipe, cle_pairs=pairs, backend=taken, backend_note=note
    )


def _pt2e_insert(float_model: fx.GraphModule, recipe: Recipe, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    from eqcore.prepare.pt2e import insert_quantizers

    return insert_quantizers(float_model, recipe, example_inputs)


def prepare_model(
    model: nn.Module,
    recipe: str | Recipe,
    example_inputs: tuple[torch.Tensor, ...],
    fuse_bn: bool = True,
    cle: bool = False,
    *,
    backend: str = "auto",
    **kwargs: object,
) -> fx.GraphModule:
    """The fake-quant model of :func:`prepare` (see there)."""
    return prepare(model, recipe, example_inputs, backend=backend, fuse_bn=fuse_bn, cle=cle, **kwargs).model

