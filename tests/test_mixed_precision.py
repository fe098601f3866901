"""Mixed precision: a recipe per layer that prepare accepts, and a suggestion whose metric is measured."""

from __future__ import annotations

import pytest
import torch

from eqcore import (
    MixedPrecisionTarget,
    MixedRecipe,
    calibrate,
    collect_logits,
    fidelity,
    get_loaders,
    get_model,
    get_recipe,
    mixed_recipe,
    suggest_mixed_precision,
)
from eqcore.errors import EQError
from eqcore.prepare.quantize import fake_quant_modules, prepare


@pytest.fixture(scope="module")
def digits():
    zoo = get_model("digits")
    loaders = get_loaders("digits", zoo.spec, batch_size=64, calib_batches=2)
    batches = [batch for _, batch in zip(range(3), loaders.eval)]
    return zoo, loaders, batches


def _quant_max(model: torch.nn.Module, name: str) -> int:
    return int(model.get_submodule(name).quant_max)


def test_mixed_recipe_keeps_the_named_layers_and_their_outputs_at_the_high_recipe(digits) -> None:
    zoo, _, _ = digits
    recipe = mixed_recipe("w4a4", "w8a8", ["fc", "layer1.conv2"])
    assert isinstance(recipe, MixedRecipe) and recipe.for_layer("fc") is get_recipe("w8a8")
    assert recipe.for_layer("conv1") is recipe and recipe.weight == get_recipe("w4a4").weight
    model = prepare(zoo.model, recipe, zoo.example_inputs()).model
    nodes = {str(n.target): n for n in model.graph.nodes if n.op == "call_module"}
    output_of = {str(n.args[0].target): name for name, n in nodes.items() if name.startswith("activation_post_process")
                 and n.args[0].op == "call_module"}
    for layer, high in (("fc", True), ("layer1.conv2", True), ("conv1", False), ("down", False)):
        assert _quant_max(model, f"{layer}.weight_fake_quant") == (127 if high else 7), layer
        assert _quant_max(model, output_of[layer]) == (255 if high else 15), layer
    stored = recipe.to_dict()
    assert stored["high"]["name"] == "w8a8" and stored["high_layers"] == ["fc", "layer1.conv2"]


def test_mixed_recipe_with_an_unknown_layer_is_one_clear_error(digits) -> None:
    zoo, _, _ = digits
    with pytest.raises(EQError, match=r"\['layer9'\] are not quantizable layers"):
        prepare(zoo.model, mixed_recipe("w4a4", "w8a8", ["layer9"]), zoo.example_inputs())


def test_targets_are_validated() -> None:
    with pytest.raises(EQError, match="needs sqnr_within_db or min_top1_agreement"):
        MixedPrecisionTarget(sqnr_within_db=None)
    with pytest.raises(EQError, match=r"min_top1_agreement must be in \[0, 1\]"):
        MixedPrecisionTarget(min_top1_agreement=1.5)


def test_suggestion_is_measured_on_the_mixed_model_a_user_prepares(digits) -> None:
    zoo, loaders, batches = digits
    target = MixedPrecisionTarget(sqnr_within_db=14.0)
    suggestion = suggest_mixed_precision(
        zoo.model, "w4a4", "w8a8", batches, target=target, calib_loader=loaders.calib,
        example_inputs=zoo.example_inputs(),
    )
    count = len(suggestion.high_layers)
    assert 0 < count < len(suggestion.order)  # neither plain recipe: some layers, not all
    assert suggestion.high_layers == suggestion.order[:count]
    assert suggestion.recipe.high_layers == suggestion.high_layers
    # what a user gets from the suggested recipe, by hand
    prepared = prepare(zoo.model, suggestion.recipe, zoo.example_inputs())
    calibrate(prepared.model, loaders.calib)
    reference = collect_logits(prepared.float_model, batches, "cpu").logits
    by_hand = fidelity(reference, collect_logits(prepared.model, batches, "cpu").logits)
    assert suggestion.fidelity.sqnr_db == pytest.approx(by_hand.sqnr_db, rel=1e-9)
    assert suggestion.met and suggestion.fidelity.sqnr_db >= suggestion.all_high.sqnr_db - 14.0
    assert suggestion.all_low.sqnr_db < suggestion.fidelity.sqnr_db < suggestion.all_high.sqnr_db
    final = suggestion.steps[-1]
    assert final.measured and final.count == count and final.sqnr_db == suggestion.fidelity.sqnr_db
    estimates = [step for step in suggestion.steps if not step.measured]
    assert estimates[0].count == len(suggestion.order)  # bisection: every layer first, then halves
    good = [step.count for step in estimates if step.sqnr_db >= suggestion.all_high.sqnr_db - 14.0]
    bad = [step.count for step in estimates if step.sqnr_db < suggestion.all_high.sqnr_db - 14.0]
    assert max(bad, default=0) + 1 == min(good) <= count


def test_targets_met_by_a_plain_recipe_suggest_it(digits) -> None:
    zoo, loaders, batches = digits
    layers = [name.rsplit(".", 1)[0] for name in fake_quant_modules(prepare(zoo.model, "w4a4", zoo.example_inputs()).model)
              if name.endswith(".weight_fake_quant")]
    kwargs = dict(calib_loader=loaders.calib, calib_batches=1)
    exact = suggest_mixed_precision(zoo.model, "w4a4", "w8a8", batches[:1], target=MixedPrecisionTarget(0.0), **kwargs)
    assert sorted(exact.high_layers) == sorted(layers) and exact.fidelity == exact.all_high and exact.met
    loose = MixedPrecisionTarget(sqnr_within_db=None, min_top1_agreement=0.5)
    low = suggest_mixed_precision(zoo.model, "w4a4", "w8a8", batches[:1], target=loose, **kwargs)
    assert low.high_layers == () and low.fidelity == low.all_low and low.met
    assert low.recipe.high_layers == () and low.all_low.top1_agreement >= 0.5
