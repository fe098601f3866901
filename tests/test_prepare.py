"""Recipes, prepare_model/calibrate, and the CLE tutorial's workflow end to end (offline)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
import torchvision
from torch import fx, nn

from eqcore import (
    EQFakeQuantize,
    EQLearnableFakeQuantize,
    calibrate,
    equalize,
    evaluate,
    find_cle_pairs,
    float_convbn_to_conv,
    get_loaders,
    get_model,
    get_recipe,
    prepare_model,
    sqnr,
)
from eqcore.errors import EQError
from eqcore.analysis.evaluate import collect_logits, evaluate_dataset, per_layer_sqnr
from eqcore.analysis.metrics import topk_accuracy
from eqcore.prepare.quantize import fake_quant_modules, prepare
from eqcore.quant.recipes import RECIPES, W8A8, QuantizerSpec

TUTORIAL_PAIRS = [[f"layer{i}.{j}.conv1", f"layer{i}.{j}.conv2"] for i in range(1, 5) for j in range(2)]


@pytest.fixture(scope="module")
def digits():
    zoo = get_model("digits")
    loaders = get_loaders("digits", zoo.spec, batch_size=64, calib_batches=4)
    reference = collect_logits(zoo.model, loaders.eval, "cpu")
    return zoo, loaders, reference


def _quantized_logits(zoo, loaders, recipe, **kwargs):
    model = prepare_model(zoo.model, recipe, zoo.example_inputs(), **kwargs)
    calibrate(model, loaders.calib)
    return model, collect_logits(model, loaders.eval, "cpu")


def test_recipes_describe_the_seed_qconfig():
    w8a8 = get_recipe("w8a8")
    assert w8a8.weight.quant_range == (-128, 127)
    assert w8a8.weight.qscheme == torch.per_channel_symmetric
    assert w8a8.activation.quant_range == (0, 255)
    assert w8a8.activation.qscheme == torch.per_tensor_affine
    assert w8a8.activation.observer == "histogram"
    assert get_recipe("w4a4").activation.quant_range == (0, 15)
    assert get_recipe("w4a8").weight.quant_range == (-8, 7)
    assert {"w8a8", "w8a8-pertensor", "w4a8", "w4a4"} <= set(RECIPES)
    assert json.loads(json.dumps(w8a8.to_dict()))["weight"]["bits"] == 8


def test_recipe_is_plain_data_users_extend():
    mine = replace(W8A8, name="w6a8", weight=replace(W8A8.weight, bits=6))
    assert mine.weight.quant_range == (-32, 31)
    assert get_recipe(mine) is mine
    conv = nn.Conv2d(3, 12, 3)
    fq = mine.qconfig(conv.out_channels).weight()
    assert isinstance(fq, EQLearnableFakeQuantize)
    assert (fq.quant_min, fq.quant_max, fq.scale.numel()) == (-32, 31, 12)


def test_non_learnable_spec_builds_eq_fake_quantize():
    spec = QuantizerSpec(bits=8, symmetric=False, per_channel=False, observer="minmax", signed=False, learnable=False)
    assert isinstance(spec.factory()(), EQFakeQuantize)


def test_bad_recipe_and_observer_names_are_clear():
    with pytest.raises(EQError, match="unknown recipe 'w9a9'.*w8a8"):
        get_recipe("w9a9")
    with pytest.raises(EQError, match="unknown observer 'fancy'"):
        QuantizerSpec(bits=8, symmetric=True, per_channel=False, observer="fancy", signed=True)
    with pytest.raises(ValueError, match="more than 16 bits"):
        QuantizerSpec(bits=17, symmetric=True, per_channel=False, observer="minmax", signed=True)


def test_qconfig_mapping_covers_convs_and_linears_with_their_channel_counts():
    model = torchvision.models.resnet18()
    prepared = prepare(model, "w8a8", (torch.randn(1, 3, 224, 224),))
    weights = {n: m for n, m in prepared.quantizers.items() if n.endswith("weight_fake_quant")}
    assert weights["fc.weight_fake_quant"].scale.numel() == 1000
    assert weights["layer4.1.conv2.weight_fake_quant"].scale.numel() == 512
    assert len(weights) == 21  # 20 convs (BN folded away) + fc
    assert all(isinstance(m, EQLearnableFakeQuantize) for m in prepared.quantizers.values())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.model.modules())


def test_prepare_leaves_the_input_model_alone():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    before = copy.deepcopy(model.state_dict())
    prepare_model(model, "w8a8", (torch.randn(1, 3, 224, 224),), cle=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_calibrate_sets_qparams_then_freezes_them(digits):
    zoo, loaders, _ = digits
    model = prepare_model(zoo.model, "w8a8", zoo.example_inputs())
    act = model.activation_post_process_0
    assert float(act.scale) == 1.0
    seen = calibrate(model, loaders.calib)
    assert seen == loaders.num_calib
    calibrated = act.scale.detach().clone()
    assert float(calibrated) != 1.0
    assert not act._observer_on and act._fake_quant_on
    assert not any(p.requires_grad for name, p in model.named_parameters() if name.endswith((".scale", ".zero_point")))
    images, _ = next(iter(loaders.eval))
    model(images * 10)
    assert torch.equal(act.scale.detach(), calibrated)


def test_calibrate_rejects_an_empty_loader(digits):
    zoo, _, _ = digits
    model = prepare_model(zoo.model, "w8a8", zoo.example_inputs())
    with pytest.raises(EQError, match="empty"):
        calibrate(model, [])


def test_model_without_quantizable_layers_is_a_clear_error():
    with pytest.raises(EQError, match="no layer the recipe 'w8a8' quantizes"):
        prepare_model(nn.Sequential(nn.ReLU(), nn.Tanh()), "w8a8", (torch.randn(2, 3),))


def test_untraceable_model_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(EQError, match="not FX-traceable"):
        prepare_model(Branchy(), "w8a8", (torch.randn(2, 3),), backend="fx")
    with pytest.raises(EQError, match="Branchy can be captured neither by torch.fx .* nor by torch.export"):
        prepare_model(Branchy(), "w8a8", (torch.randn(2, 3),))


def test_digits_accuracy_w8a8_within_one_point_and_w4a4_lower(digits):
    zoo, loaders, reference = digits
    float_acc = topk_accuracy(reference.logits, reference.labels)
    assert float_acc >= 0.97
    _, w8 = _quantized_logits(zoo, loaders, "w8a8")
    _, w4 = _quantized_logits(zoo, loaders, "w4a4")
    w8_acc = topk_accuracy(w8.logits, w8.labels)
    w4_acc = topk_accuracy(w4.logits, w4.labels)
    assert abs(float_acc - w8_acc) <= 0.01
    assert w4_acc < float_acc
    # fidelity tells the same story with a wide margin
    assert float(sqnr(reference.logits, w8.logits)) > float(sqnr(reference.logits, w4.logits)) + 10


def _tutorial_float_steps(model: nn.Module):
    model.train()
    traced = fx.symbolic_trace(model)
    traced.eval()
    traced = float_convbn_to_conv(traced)
    pairs = []
    for node in traced.graph.nodes:
        if node.op == "call_module" and hasattr(traced.get_submodule(node.target), "weight"):
            from eqcore import get_previous_module_node

            prev = get_previous_module_node(traced, node, (nn.Conv2d, nn.Linear), CLE_compatible=True)
            if prev:
                pairs.append([prev.target, node.target])
    return traced, pairs


@pytest.mark.slow
def test_cle_tutorial_workflow_on_seeded_resnet18(capsys):
    zoo = get_model("resnet18")
    traced, pairs = _tutorial_float_steps(copy.deepcopy(zoo.model))
    assert pairs == TUTORIAL_PAIRS
    assert find_cle_pairs(traced) == pairs
    cle_model = equalize(traced, pairs, threshold=1e-4, inplace=False)
    x = zoo.example_inputs(2)[0]
    with torch.no_grad():
        reference = zoo.model.eval()(x)
        assert torch.allclose(cle_model(x), reference, rtol=1e-4, atol=1e-4 * reference.abs().max())
    loaders = get_loaders("samples", zoo.spec, batch_size=8, calib_batches=2)
    results = {}
    for cle in (True, False):
        model = prepare_model(zoo.model, "w8a8", zoo.example_inputs(), cle=cle)
        calibrate(model, loaders.calib)
        result = evaluate(model, "cpu")
        assert len(result.predictions) == 5
        results[cle] = collect_logits(model, loaders.eval, "cpu").logits
    printed = capsys.readouterr().out
    assert printed.count("Evaluation:") == 2
    float_logits = collect_logits(zoo.model, loaders.eval, "cpu").logits
    for cle, logits in results.items():
        assert float(sqnr(float_logits, logits)) > 10, f"cle={cle}"


def test_cle_tutorial_workflow_on_digits(digits):
    zoo, loaders, reference = digits
    traced, pairs = _tutorial_float_steps(copy.deepcopy(zoo.model))
    assert pairs, "the digits model has conv -> relu -> conv pairs inside its residual blocks"
    cle_model = equalize(traced, pairs, threshold=1e-4, inplace=False)
    float_acc = topk_accuracy(reference.logits, reference.labels)
    assert topk_accuracy(collect_logits(cle_model, loaders.eval, "cpu").logits, reference.labels) == float_acc
    for cle in (True, False):
        prepared = prepare(zoo.model, "w8a8-pertensor", zoo.example_inputs(), cle=cle)
        calibrate(prepared.model, loaders.calib)
        evaluation = evaluate_dataset(prepared.model, loaders.eval, "cpu")
        assert abs(evaluation.top1 - float_acc) <= 0.01, f"cle={cle}"
        layers = per_layer_sqnr(prepared.float_model, prepared.model, next(iter(loaders.eval))[0])
        assert layers and all(v > 15 for v in layers.values()), layers
        assert (prepared.cle_pairs is not None) == cle


def test_fake_quant_modules_lists_every_quantizer(digits):
    zoo, _, _ = digits
    model = prepare_model(zoo.model, "w8a8", zoo.example_inputs())
    found = fake_quant_modules(model)
    assert "conv1.weight_fake_quant" in found or any(k.endswith("weight_fake_quant") for k in found)
    assert any(k.startswith("activation_post_process_") for k in found)
