"""The PT2E backend: torch.export capture, BN folding on it, torchao insertion with eqcore's
quantizer, and every downstream stage on the result, checked against the FX backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from eqcore._torch_ao import FakeQuantizeBase
from eqcore.analysis.binning import bin_indices
from eqcore.analysis.evaluate import per_layer_sqnr
from eqcore.analysis.hooks import activation_quantizers
from eqcore.analysis.metrics import sqnr
from eqcore.analysis.sa_hooks import add_sensitivity_analysis_hooks
from eqcore.analysis.sa_run import run_sensitivity_analysis
from eqcore.errors import EQError
from eqcore.plots.api import plot_quant_act_SA_hist, plot_quant_weight_hist
from eqcore.prepare.calibrate import calibrate
from eqcore.prepare.pt2e_rules import GRID_PRESERVING
from eqcore.prepare.quantize import prepare
from eqcore.quant.modules import EQFakeQuantize, EQLearnableFakeQuantize
from eqcore.quant.pt2e_modules import PT2EFakeQuantize, PT2ELearnableFakeQuantize, pt2e_variant
from eqcore.quant.recipes import W8A8, W8A8_PERTENSOR
from eqcore.quant.toggles import disable_fake_quant
from test_hooks import Recorder, three_batches


class Block(nn.Module):
    """conv-bn-relu -> conv-bn, a residual add and relu, pool, linear: the resnet pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(y.mean((2, 3)))


class ShapeBranch(Block):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            x = x * 2
        return super().forward(x)


class DataBranch(Block):
    """Control flow on the data: neither torch.fx nor torch.export can capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return super().forward(x)


def _trained_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so folding changes the weights."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


def _model(cls: type[nn.Module] = Block) -> nn.Module:
    torch.manual_seed(0)
    return _trained_bn(cls())


def _example() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)


def test_pt2e_fake_quantizers_are_bit_identical_to_eqcore_modules() -> None:
    x = torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(0)) * 3
    for spec, channels in ((W8A8.weight, 4), (W8A8.activation, None)):
        ours, theirs = spec.factory(channels)(), pt2e_variant(spec.factory(channels))()
        assert type(theirs) is PT2ELearnableFakeQuantize and isinstance(theirs, FakeQuantizeBase)
        outputs = []
        for module in (ours, theirs):
            module(x.clone())  # observe: the same observer sets the same qparams
            module.enable_param_learning()
            xi = x.clone().requires_grad_(True)
            y = module(xi)
            y.backward(torch.cos(y.detach()))
            outputs.append((y.detach(), xi.grad, module.scale.grad, module.scale.detach()))
        for a, b in zip(*outputs):
            assert torch.equal(a, b)
    plain = pt2e_variant(W8A8.activation.__class__(**{**W8A8.activation.__dict__, "learnable": False}).factory())()
    assert type(plain) is PT2EFakeQuantize and isinstance(plain, EQFakeQuantize)
    reference = W8A8.activation.__class__(**{**W8A8.activation.__dict__, "learnable": False}).factory()()
    assert torch.equal(plain(x.clone()), reference(x.clone()))
    assert not isinstance(EQLearnableFakeQuantize(), PT2ELearnableFakeQuantize)


def test_pt2e_folds_bn_and_names_everything_after_the_module_paths() -> None:
    model = _model()
    prepared = prepare(model, "w8a8", _example(), backend="pt2e")
    assert prepared.backend == "pt2e"
    float_modules = dict(prepared.float_model.named_modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in float_modules.values())
    assert type(float_modules["conv1"]) is nn.Conv2d and type(float_modules["fc"]) is nn.Linear
    # the folded reference computes what the model computes
    x = _example()[0]
    with torch.no_grad():
        torch.testing.assert_close(prepared.float_model(x), model(x), rtol=1e-5, atol=1e-5)
    assert set(prepared.quantizers) == {
        "input_quant",
        "conv1.weight_fake_quant", "conv1.output_quant",
        "conv2.weight_fake_quant", "conv2.output_quant",
        "add_relu_quant",
        "mean_quant",
        "fc.weight_fake_quant", "fc.output_quant",
    }
    # weights are quantized folded: conv1's weight is the BN-scaled one
    bn = model.bn1
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(prepared.model.conv1.weight, model.conv1.weight * factor[:, None, None, None])
    assert prepared.model.conv1.weight_fake_quant.channel_len == 8
    assert model.conv1.weight is not prepared.model.conv1.weight  # the input model is untouched


def test_pt2e_model_runs_every_downstream_stage(tmp_path) -> None:
    model = _model()
    prepared = prepare(model, "w8a8", _example(), backend="pt2e")
    quant = prepared.model
    data = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert calibrate(quant, data) == 12
    x = data[0]
    with torch.no_grad():
        float_out, quant_out = prepared.float_model(x), quant(x)
        assert 25 < sqnr(float_out, quant_out) < 80
        quant.apply(disable_fake_quant)
        torch.testing.assert_close(quant(x), float_out, rtol=1e-5, atol=1e-5)
    layers = per_layer_sqnr(prepared.float_model, prepared.model, x)
    assert set(layers) == {"conv1", "conv2", "fc"}  # fake quant is off: every layer is exact
    assert all(value == float("inf") for value in layers.values())
    quant.apply(lambda m: m.enable_fake_quant(True) if isinstance(m, FakeQuantizeBase) else None)
    layers = per_layer_sqnr(prepared.float_model, prepared.model, x)
    assert all(20 < value < 80 for value in layers.values())
    sa = run_sensitivity_analysis(quant, [(x, None)], bit_res=None)
    assert set(sa.weights) == {"conv1", "conv2", "fc"}
    assert set(sa.activations) == {name for name, _ in activation_quantizers(quant)}
    assert not sa.errors and all(a.hist.sum() > 0 for a in sa.activations.values())
    # the seeds' plot functions, as the tutorials call them
    forward, backward = add_sensitivity_analysis_hooks(quant, bit_res=8)
    quant(x.requires_grad_(True)).mean().backward()
    act_files = plot_quant_act_SA_hist(forward, backward, file_path=tmp_path / "act", plot_title="SA", workers=1)
    weight_files = plot_quant_weight_hist(quant, file_path=tmp_path / "w", plot_title="W", sensitivity_analysis=True,
                                          workers=1)
    forward.remove_hooks()
    backward.remove_hooks()
    assert len(act_files) == len(activation_quantizers(quant)) and len(weight_files) == 3
    assert all(Path(f).read_bytes().startswith(b"\x89PNG") for f in [*act_files, *weight_files])


@pytest.fixture(scope="module")
def pt2e_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    prepared = prepare(model, "w8a8", (torch.randn(1, 3, 64, 64),), backend="pt2e").model
    calibrate(prepared, [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))])
    return prepared


@pytest.mark.slow
def test_sa_counts_and_gradients_add_up_on_a_pt2e_resnet(pt2e_resnet: nn.Module) -> None:
    forward, backward = add_sensitivity_analysis_hooks(pt2e_resnet)
    names = list(forward.hook_handles)
    assert names == [name for name, _ in activation_quantizers(pt2e_resnet)] and len(names) > 20
    recorder = Recorder(pt2e_resnet, names)
    try:
        for batch in three_batches():
            pt2e_resnet(batch).mean().backward()
    finally:
        recorder.remove()
        forward.remove_hooks()
        backward.remove_hooks()
    pt2e_resnet.zero_grad(set_to_none=True)
    assert forward.errors == {} and backward.errors == {}
    for name in names:
        hist, grads = forward.data[name], backward.data[name]
        module = pt2e_resnet.get_submodule(name)
        seen = sum(x.numel() for x in recorder.inputs[name])
        assert hist.numel == seen and hist.calls == 3
        assert hist.counts.sum() + hist.nan_count == seen
        grad_sum = sum(g.double().sum().item() for g in recorder.grads[name])
        grad_abs = sum(g.double().abs().sum().item() for g in recorder.grads[name])
        assert grads.binned_grads.sum() + grads.nan_grad_sum == pytest.approx(grad_sum, rel=1e-9, abs=1e-12 * grad_abs)
        counts = np.zeros(hist.grid.n_bins + 1, dtype=np.int64)
        for x in recorder.inputs[name]:
            index = bin_indices(x, module.scale, module.zero_point, hist.grid).reshape(-1).long()
            counts += torch.bincount(index, minlength=hist.grid.n_bins + 1).numpy()
        np.testing.assert_array_equal(hist.counts, counts[:-1])


@pytest.mark.slow
def test_resnet18_fx_and_pt2e_agree_on_weight_scales_and_fidelity() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    generator = torch.Generator().manual_seed(5)
    calib = [torch.randn(4, 3, 96, 96, generator=generator) for _ in range(2)]
    x = torch.randn(4, 3, 96, 96, generator=generator)
    results = {}
    for backend in ("fx", "pt2e"):
        prepared = prepare(model, "w8a8", (calib[0][:1],), backend=backend)
        calibrate(prepared.model, calib)
        with torch.no_grad():
            fidelity = sqnr(prepared.float_model(x), prepared.model(x))
        scales = {
            name: module.weight_fake_quant.calculate_qparams()[0]
            for name, module in prepared.model.named_modules()
            if hasattr(module, "weight_fake_quant")
        }
        results[backend] = (fidelity, scales)
    (fx_db, fx_scales), (pt2e_db, pt2e_scales) = results["fx"], results["pt2e"]
    assert fx_scales.keys() == pt2e_scales.keys() and len(fx_scales) == 21
    for name in fx_scales:
        assert torch.equal(fx_scales[name], pt2e_scales[name]), name
    assert abs(fx_db - pt2e_db) < 0.5, (fx_db, pt2e_db)


def test_auto_takes_fx_when_the_model_traces_and_pt2e_otherwise() -> None:
    traced = prepare(_model(), W8A8, _example())
    assert traced.backend == "fx" and "traces with torch.fx" in traced.backend_note
    exported = prepare(_model(ShapeBranch), W8A8, _example())
    assert exported.backend == "pt2e" and "does not trace with torch.fx" in exported.backend_note
    x = _example()[0]
    with torch.no_grad():
        torch.testing.assert_close(exported.float_model(x), _model(ShapeBranch)(x), rtol=1e-5, atol=1e-5)


def test_a_model_neither_backend_captures_is_one_clear_error() -> None:
    with pytest.raises(EQError) as info:
        prepare(_model(DataBranch), W8A8, _example())
    message = str(info.value)
    assert message.startswith("DataBranch can be captured neither by torch.fx")
    assert "nor by torch.export" in message and "\n" not in message
    with pytest.raises(EQError, match="unknown backend 'tvm'; choose one of auto, fx, pt2e"):
        prepare(_model(), W8A8, _example(), backend="tvm")


class Chain(nn.Module):
    """conv-bn-relu -> conv -> gelu -> conv: one CLE pair, and one that GELU breaks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.conv3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.conv3(nn.functional.gelu(x)).mean((2, 3))


def test_per_tensor_recipe_and_cle_on_an_exported_graph() -> None:
    model = _model(Chain)
    prepared = prepare(model, W8A8_PERTENSOR, _example(), backend="pt2e", cle=True)
    assert prepared.model.conv1.weight_fake_quant.scale.numel() == 1
    assert prepared.cle_pairs.pairs == [["conv1", "conv2"]]
    assert any(
        s.module == "conv3" and "gelu" in s.reason and "not positively homogeneous" in s.reason
        for s in prepared.cle_pairs.skipped
    ), prepared.cle_pairs.skipped
    first, second = prepared.float_model.conv1.weight, prepared.float_model.conv2.weight
    ranges1 = first.detach().abs().amax((1, 2, 3))
    ranges2 = second.detach().abs().amax((0, 2, 3))
    torch.testing.assert_close(ranges1, ranges2, rtol=1e-3, atol=1e-6)  # equalized
    x = _example()[0]
    with torch.no_grad():
        torch.testing.assert_close(prepared.float_model(x), model(x), rtol=1e-4, atol=1e-5)


class PreNorm(nn.Module):
    """Two pre-norm residual blocks, h = h + fc(norm(h)), as in a transformer, then a token head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.norm1, self.fc1 = nn.LayerNorm(16), nn.Linear(16, 16)
        self.norm2, self.fc2 = nn.LayerNorm(16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc1(self.norm1(h))
        h = h + self.fc2(self.norm2(h))
        return self.head(h[:, 0])


def test_residual_adds_read_their_producers_quantizers_and_each_tensor_is_quantized_once() -> None:
    """A residual add's inputs are already quantized (the stream by the previous add or the
    embedding, the branch by its layer's output quantizer): PT2E gives them no second quantizer,
    and the stream's one quantizer feeds both the LayerNorm and the add. The only tensors PT2E
    quantizes and FX does not are the residual stream after each add (FX keeps it in float)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    prepared = prepare(PreNorm().eval(), "w8a8", (x,), backend="pt2e")
    gm = prepared.model
    assert set(prepared.quantizers) == {
        "input_quant", "embed.weight_fake_quant", "embed.output_quant",
        "norm1.layer_norm_quant", "fc1.weight_fake_quant", "fc1.output_quant", "add_quant",
        "norm2.layer_norm_quant", "fc2.weight_fake_quant", "fc2.output_quant", "add_quant_1",
        "head.weight_fake_quant", "head.output_quant",
    }
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in prepared.quantizers]
    by_name = {n.target: n for n in calls}
    assert len(calls) == len(by_name) == 9  # every activation quantizer is called once
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.add.Tensor]
    assert [[a.target for a in add.args] for add in adds] == [
        ["embed.output_quant", "fc1.output_quant"], ["add_quant", "fc2.output_quant"]
    ]
    for stream in ("embed.output_quant", "add_quant"):  # one quantizer, shared by both consumers
        users = {u.target for u in by_name[stream].users}
        assert len(users) == 2 and torch.ops.aten.add.Tensor in users, users
    # No quantizer re-quantizes another's output, even through ops that keep values on their grid.
    for node in calls:
        source = node.args[0]
        while source.op == "call_function" and source.target in GRID_PRESERVING:
            source = source.args[0]
        assert source not in calls, (node.target, source.target)
    # FX quantizes the same tensors except the stream between the adds, which it keeps in float
    # (its quantizer of the last add's output is the head's input quantizer).
    fx_model = prepare(PreNorm().eval(), "w8a8", (x,), backend="fx")
    assert len(prepared.quantizers) == len(fx_model.quantizers) + 1
