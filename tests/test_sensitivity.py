"""Per-layer sensitivity: every number is what toggling the named quantizers by hand gives.

The digits model at w4a4 (FX), a graph whose in-place op rules out replaying (full passes), and
a torch.export model prepared by torchao's PT2E flow; the sweep must leave each model as found.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from eqcore import (
    EQFakeQuantize,
    calibrate,
    collect_logits,
    fidelity,
    find_quantized_layers,
    get_loaders,
    get_model,
    per_layer_sensitivity,
    run_sensitivity_analysis,
    sqnr,
)
from eqcore._torch_ao import FakeQuantizeBase, tq
from eqcore.analysis.replay import GraphReplay
from eqcore.analysis.sensitivity import spearman
from eqcore.errors import EQError
from eqcore.prepare.quantize import fake_quant_modules, prepare

BATCHES = 3


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    zoo = get_model("digits")
    loaders = get_loaders("digits", zoo.spec, batch_size=32, calib_batches=2)
    prepared = prepare(zoo.model, "w4a4", zoo.example_inputs())
    calibrate(prepared.model, loaders.calib)
    batches = [batch for _, batch in zip(range(BATCHES), loaders.eval)]
    report = per_layer_sensitivity(prepared, batches)
    return prepared, batches, report


def toggled_logits(model: nn.Module, batches, enabled) -> torch.Tensor:
    """Logits with exactly the ``enabled`` quantizers on, set by hand; every quantizer back on after."""
    quantizers = fake_quant_modules(model)
    for name, quantizer in quantizers.items():
        quantizer.enable_fake_quant(name in enabled)
    try:
        return collect_logits(model, batches, "cpu").logits
    finally:
        for quantizer in quantizers.values():
            quantizer.enable_fake_quant(True)


def test_layers_are_the_weighted_modules_with_the_quantizer_at_their_output(digits) -> None:
    prepared, _, report = digits
    model = prepared.model
    weighted = [n for n, m in model.named_modules() if isinstance(getattr(m, "weight_fake_quant", None), FakeQuantizeBase)]
    assert [row.name for row in report.layers] == weighted
    nodes = {str(n.target): n for n in model.graph.nodes if n.op == "call_module"}
    for row in report.layers:
        weight_q, output_q = row.quantizers
        assert weight_q == f"{row.name}.weight_fake_quant"
        assert nodes[output_q].args[0] is nodes[row.name]  # the quantizer right after the (fused) layer
    owned = {q for row in report.layers for q in row.quantizers}
    assert set(report.other_quantizers) == set(fake_quant_modules(model)) - owned
    assert report.other_quantizers  # the input, the residual add and the pooled features


def test_isolated_and_leave_one_out_match_toggling_by_hand(digits) -> None:
    prepared, batches, report = digits
    model = prepared.model
    reference = toggled_logits(model, batches, ())
    everything = set(fake_quant_modules(model))
    for row in report.layers:
        isolated = sqnr(reference, toggled_logits(model, batches, set(row.quantizers)))
        leave_one_out = sqnr(reference, toggled_logits(model, batches, everything - set(row.quantizers)))
        assert row.isolated_sqnr_db == pytest.approx(isolated, rel=1e-12, abs=1e-9), row.name
        assert row.leave_one_out_sqnr_db == pytest.approx(leave_one_out, rel=1e-12, abs=1e-9), row.name
    assert len({round(row.isolated_sqnr_db, 3) for row in report.layers}) == len(report.layers)


def test_whole_model_fidelities_match_toggling_by_hand(digits) -> None:
    prepared, batches, report = digits
    model = prepared.model
    names = set(fake_quant_modules(model))
    weights = {name for name in names if name.endswith("weight_fake_quant")}
    reference = toggled_logits(model, batches, ())
    for measured, enabled in (
        (report.weights_only, weights),
        (report.activations_only, names - weights),
        (report.all_quantizers, names),
    ):
        by_hand = fidelity(reference, toggled_logits(model, batches, enabled))
        for field in ("sqnr_db", "cosine_similarity", "top1_agreement", "kl_divergence"):
            assert getattr(measured, field) == pytest.approx(getattr(by_hand, field), rel=1e-12, abs=1e-12)
    assert report.all_quantizers.sqnr_db < min(report.weights_only.sqnr_db, report.activations_only.sqnr_db)


def _captured(model: nn.Module, batches, enabled, modules: dict[str, str]) -> dict[str, list[torch.Tensor]]:
    """Per batch, with ``enabled`` quantizers on: each ``modules`` entry's input ("in") or output ("out")."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = []
    for name, where in modules.items():
        module = model.get_submodule(name)
        if where == "in":
            handles.append(module.register_forward_pre_hook(lambda _m, args, n=name: seen[n].append(args[0].clone())))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, n=name: seen[n].append(out.clone())))
    try:
        toggled_logits(model, batches, enabled)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _db(reference: list[torch.Tensor], test: list[torch.Tensor]) -> float:
    return sqnr(torch.cat([r.flatten() for r in reference]), torch.cat([t.flatten() for t in test]))


def test_local_and_cumulative_errors_match_the_layer_run_by_hand(digits) -> None:
    prepared, batches, report = digits
    model = prepared.model
    for row in (report.layers[0], report.layer("layer1.conv2"), report.layers[-1]):
        weight_q, output_q = row.quantizers
        float_run = _captured(model, batches, (), {row.name: "in", output_q: "out"})
        everything_on = _captured(model, batches, set(fake_quant_modules(model)), {output_q: "out"})
        layer, quantizer = model.get_submodule(row.name), model.get_submodule(output_q)
        local = []
        with torch.no_grad():
            for x in float_run[row.name]:  # the layer fed its float input, its own quantizers on
                for name, q in fake_quant_modules(model).items():
                    q.enable_fake_quant(name in row.quantizers)
                local.append(quantizer(layer(x)))
        for q in fake_quant_modules(model).values():
            q.enable_fake_quant(True)
        assert row.local_sqnr_db == pytest.approx(_db(float_run[output_q], local), rel=1e-9), row.name
        assert row.cumulative_sqnr_db == pytest.approx(_db(float_run[output_q], everything_on[output_q]), rel=1e-9)
    last = report.layers[-1]  # the classifier's output is the logits
    assert last.local_sqnr_db == pytest.approx(last.isolated_sqnr_db, rel=1e-9)


def test_sa_scores_and_their_rank_correlation_with_the_sweep(digits) -> None:
    prepared, batches, report = digits
    sa = run_sensitivity_analysis(prepared.model, batches, batches=len(batches), bit_res=None)
    for row in report.layers:
        weight_q, output_q = row.quantizers
        expected = sa.weights[row.name].score + sa.activations[output_q].score
        assert row.sa_score == pytest.approx(expected, rel=1e-6), row.name
    scores = [row.sa_score for row in report.layers]
    drops = [-row.isolated_sqnr_db for row in report.layers]
    assert report.spearman == pytest.approx(spearmanr(scores, drops).statistic, abs=1e-12)
    assert sorted(row.sa_rank for row in report.layers) == list(range(1, len(report.layers) + 1))
    assert report.most_sensitive(1)[0].isolated_sqnr_db == min(row.isolated_sqnr_db for row in report.layers)


def test_spearman_matches_scipy_with_ties_and_skips_nan() -> None:
    rng = random.Random(0)
    for _ in range(20):
        a = [rng.choice([1.0, 2.0, 3.0, rng.random()]) for _ in range(9)]
        b = [rng.choice([5.0, rng.random()]) for _ in range(9)]
        assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman([1.0, math.nan, 2.0, 3.0, 4.0], [1.0, 9.0, 2.0, 4.0, 3.0]) == pytest.approx(0.8)
    assert math.isnan(spearman([1.0, 2.0], [2.0, 1.0]))
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def _flags(model: nn.Module) -> list[tuple[str, int, int, bool]]:
    return [
        (name, int(q.fake_quant_enabled[0]), int(getattr(q, "static_enabled", q.observer_enabled)[0]), q.training)
        for name, q in fake_quant_modules(model).items()
    ]


def test_sweep_leaves_the_model_exactly_as_found(digits) -> None:
    prepared, batches, _ = digits
    model = prepared.model
    quantizers = list(fake_quant_modules(model).values())
    model.train()
    quantizers[2].enable_fake_quant(False)
    quantizers[5].enable_observer(True)  # its observer would move its qparams if a pass observed
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags, training = _flags(model), [(n, m.training) for n, m in model.named_modules()]
    try:
        per_layer_sensitivity(model, batches[:1])
        after = model.state_dict()
        assert state.keys() == after.keys()
        assert all(torch.equal(state[k], after[k]) for k in state)
        assert _flags(model) == flags
        assert [(n, m.training) for n, m in model.named_modules()] == training
        assert all(p.grad is None for p in model.parameters())
        for module in model.modules():
            assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    finally:
        model.eval()
        quantizers[2].enable_fake_quant(True)
        quantizers[5].enable_observer(False)


def test_replay_gives_the_full_forward_bit_for_bit(digits) -> None:
    prepared, batches, _ = digits
    model = prepared.model
    quantizers = fake_quant_modules(model)
    replay = GraphReplay(model, quantizers)
    assert replay.usable
    x = batches[0][0]
    rng = random.Random(1)
    with torch.no_grad():
        for quantizer in quantizers.values():
            quantizer.enable_fake_quant(False)
        _, recorded = replay.record((x,))
        for _ in range(5):
            toggled = rng.sample(sorted(quantizers), 3)
            for name in toggled:
                quantizers[name].enable_fake_quant(True)
            assert torch.equal(replay.rerun(recorded, toggled, (x,)), model(x))
            for name in toggled:
                quantizers[name].enable_fake_quant(False)
    for quantizer in quantizers.values():
        quantizer.enable_fake_quant(True)


def test_replay_off_gives_the_same_report(digits) -> None:
    prepared, batches, _ = digits
    replayed = per_layer_sensitivity(prepared, batches[:1])
    full = per_layer_sensitivity(prepared, batches[:1], replay=False, sa=None)
    assert replayed == full


class SharedInPlace(nn.Module):
    """A ReLU that overwrites a value another op reads too: replaying cannot reuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = y * 0.5
        y = y.relu_()
        return self.fc((self.conv2(y) + z).flatten(1))


def test_a_graph_that_cannot_be_replayed_is_swept_with_full_passes() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    prepared = prepare(SharedInPlace().eval(), "w4a8", (x[:2],))
    calibrate(prepared.model, [x])
    assert not GraphReplay(prepared.model, fake_quant_modules(prepared.model)).usable
    batches = [x[:8], x[8:]]
    report = per_layer_sensitivity(prepared, batches)
    reference = toggled_logits(prepared.model, batches, ())
    assert [row.name for row in report.layers] == ["conv", "conv2", "fc"]
    for row in report.layers:
        assert row.isolated_sqnr_db == pytest.approx(
            sqnr(reference, toggled_logits(prepared.model, batches, set(row.quantizers))), rel=1e-12
        )


class CalledTwice(nn.Module):
    """One conv applied twice: one layer, toggled as one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(torch.relu(self.conv(x))).flatten(1))


def test_a_module_called_twice_is_one_layer() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 2, 8, 8)
    prepared = prepare(CalledTwice().eval(), "w8a8", (x[:2],))
    calibrate(prepared.model, [x])
    report = per_layer_sensitivity(prepared, [x])
    assert [row.name for row in report.layers] == ["conv", "fc"]
    reference = toggled_logits(prepared.model, [x], ())
    for row in report.layers:
        assert row.isolated_sqnr_db == pytest.approx(
            sqnr(reference, toggled_logits(prepared.model, [x], set(row.quantizers))), rel=1e-12
        )


def test_a_model_without_quantizers_or_data_is_one_clear_error(digits) -> None:
    prepared, batches, _ = digits
    with pytest.raises(EQError, match="no fake-quant modules; prepare it first"):
        per_layer_sensitivity(get_model("digits").model, batches)
    with pytest.raises(EQError, match="the loader gave no batches"):
        per_layer_sensitivity(prepared, [])
    with pytest.raises(EQError, match="batches must be at least 1"):
        per_layer_sensitivity(prepared, batches, batches=0)


class _ActFQ(EQFakeQuantize):
    def __init__(self, **_: object) -> None:
        super().__init__(observer=tq.MinMaxObserver, quant_min=0, quant_max=15, dtype=torch.quint8,
                         qscheme=torch.per_tensor_affine)


class _WeightFQ(EQFakeQuantize):
    def __init__(self, **_: object) -> None:
        super().__init__(observer=tq.MinMaxObserver, quant_min=-8, quant_max=7, dtype=torch.qint8,
                         qscheme=torch.per_tensor_symmetric)


class ConvReluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(torch.relu(self.conv(x))).flatten(1))


def _pt2e_model(x: torch.Tensor) -> nn.Module:
    """ConvReluNet through torch.export and torchao's prepare_pt2e, eqcore quantizers on every
    conv/linear weight, input and output (after the ReLU)."""
    pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

    act = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=15, qscheme=torch.per_tensor_affine,
                           observer_or_fake_quant_ctr=_ActFQ)
    weight = QuantizationSpec(dtype=torch.int8, quant_min=-8, quant_max=7, qscheme=torch.per_tensor_symmetric,
                              observer_or_fake_quant_ctr=_WeightFQ)
    ops = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)

    class Annotator(Quantizer):
        def annotate(self, model):
            for node in [n for n in model.graph.nodes if n.op == "call_function" and n.target in ops]:
                users = list(node.users)
                relu = users[0] if len(users) == 1 and users[0].target == torch.ops.aten.relu.default else None
                inputs = {node.args[0]: act, node.args[1]: weight}
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map=inputs, output_qspec=None if relu else act, _annotated=True
                )
                if relu is not None:
                    relu.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=act, _annotated=True)
            return model

        def validate(self, model) -> None:
            pass

    torch.manual_seed(0)
    model = pt2e.prepare_pt2e(torch.export.export(ConvReluNet().eval(), (x,)).module(), Annotator())
    allow_exported_model_train_eval(model)
    return model


def test_pt2e_model_layers_and_sweep_match_toggling_by_hand() -> None:
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    batches = [x[:6], x[6:]]
    model = _pt2e_model(batches[0])
    for batch in batches:
        model(batch)
    for quantizer in fake_quant_modules(model).values():
        quantizer.enable_observer(False)
    layers = find_quantized_layers(model)
    assert [layer.name for layer in layers] == ["conv", "conv2", "fc"]
    nodes = {n.name: n for n in model.graph.nodes}
    for layer in layers:
        weight_node = next(n for n in nodes.values() if n.op == "call_module" and n.target == layer.weight_quantizer)
        assert weight_node.args[0].op == "get_attr" and weight_node.args[0].target == f"{layer.name}.weight"
    relu = next(n for n in nodes.values() if n.target == torch.ops.aten.relu.default)
    assert next(iter(relu.users)).target == layers[0].output_quantizer  # after the fused ReLU
    report = per_layer_sensitivity(model, batches)
    reference = toggled_logits(model, batches, ())
    everything = set(fake_quant_modules(model))
    for row in report.layers:
        assert row.isolated_sqnr_db == pytest.approx(
            sqnr(reference, toggled_logits(model, batches, set(row.quantizers))), rel=1e-12
        )
        assert row.leave_one_out_sqnr_db == pytest.approx(
            sqnr(reference, toggled_logits(model, batches, everything - set(row.quantizers))), rel=1e-12
        )
        assert row.sa_score > 0
