"""BatchNorm folding: float FX graphs (float_convbn_to_conv) and QAT models (qat_convbn_to_conv)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import fx, nn

from eqcore import convbn_to_conv, float_convbn_to_conv, qat_convbn_to_conv
from eqcore._torch_ao import QConfig, QConfigMapping, _LearnableFakeQuantize, prepare_qat_fx, tq

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.nn.qat as nnqat


def randomize_batchnorms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial running stats and affine params (some negative gammas), so folding matters."""
    g = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            n = bn.num_features
            with torch.no_grad():
                if bn.running_mean is not None:
                    bn.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                    bn.running_var.copy_(torch.rand(n, generator=g) * 2.0 + 0.25)
                if bn.weight is not None:
                    sign = torch.where(torch.rand(n, generator=g) < 0.1, -1.0, 1.0)
                    bn.weight.copy_((torch.rand(n, generator=g) + 0.5) * sign)
                    bn.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def traced_eval(model: nn.Module) -> fx.GraphModule:
    traced = fx.symbolic_trace(model)
    traced.eval()
    return traced


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_float_fusion_preserves_float64_output(name):
    torch.manual_seed(0)
    model = randomize_batchnorms(getattr(torchvision.models, name)()).double().eval()
    traced = traced_eval(model)
    fused = float_convbn_to_conv(traced)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference, out = model(x), fused(x)
    assert rel_err(out, reference) < 1e-9
    assert not has_batchnorm(fused)
    assert not any(n.op == "call_module" and "bn" in n.target for n in fused.graph.nodes)
    assert has_batchnorm(traced), "inplace=False must leave the input untouched"
    assert all(p.dtype == torch.float64 for p in fused.parameters())


class _LayerThenBN(nn.Module):
    def __init__(self, layer: nn.Module, bn: nn.Module):
        super().__init__()
        self.layer, self.bn = layer, bn

    def forward(self, x):
        return torch.relu(self.bn(self.layer(x)))


@pytest.mark.parametrize(
    ("layer", "bn", "shape"),
    [
        (nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), (2, 3, 9)),
        (nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), (2, 3, 9, 9)),
        (nn.Conv2d(4, 8, 3, groups=4, padding=1), nn.BatchNorm2d(8), (2, 4, 9, 9)),
        (nn.Conv3d(3, 6, 3), nn.BatchNorm3d(6), (2, 3, 5, 5, 5)),
        (nn.Linear(5, 7), nn.BatchNorm1d(7), (4, 5)),
        (nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7, affine=False), (4, 5)),
        (nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6, affine=False), (2, 3, 4, 4)),
    ],
    ids=["conv1d", "conv2d-nobias", "grouped", "conv3d", "linear", "linear-affine-false",
         "affine-false"],
)
def test_float_fusion_layer_kinds(layer, bn, shape):
    torch.manual_seed(0)
    model = randomize_batchnorms(_LayerThenBN(layer, bn)).double().eval()
    fused = float_convbn_to_conv(traced_eval(model))
    x = torch.randn(shape, dtype=torch.float64)
    assert rel_err(fused(x), model(x)) < 1e-12
    assert not hasattr(fused, "bn")
    assert fused.layer.bias is not None


def test_float_fusion_keeps_float32_dtype_and_parameters():
    torch.manual_seed(0)
    model = randomize_batchnorms(_LayerThenBN(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))).eval()
    x = torch.randn(2, 3, 8, 8)
    reference = model(x)
    traced = traced_eval(model)
    weight = traced.layer.weight
    fused = float_convbn_to_conv(traced, inplace=True)
    assert fused is traced
    assert fused.layer.weight is weight and weight.dtype == torch.float32
    assert rel_err(fused(x), reference) < 1e-5


def test_float_fusion_leaves_bn_without_running_stats():
    model = _LayerThenBN(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, track_running_stats=False)).eval()
    fused = float_convbn_to_conv(traced_eval(model))
    assert isinstance(fused.bn, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fused(x), model(x))


class _ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _ConvCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


@pytest.mark.parametrize("cls", [_ConvUsedTwice, _ConvCalledTwice])
def test_float_fusion_skips_shared_conv_outputs_and_modules(cls):
    torch.manual_seed(0)
    model = randomize_batchnorms(cls()).double().eval()
    fused = float_convbn_to_conv(traced_eval(model))
    assert isinstance(fused.bn, nn.BatchNorm2d)
    x = torch.randn(2, 3 if cls is _ConvUsedTwice else 6, 8, 8, dtype=torch.float64)
    assert torch.equal(fused(x), model(x))


def test_float_fusion_requires_eval_mode():
    model = _LayerThenBN(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    traced = fx.symbolic_trace(model)
    traced.train()
    with pytest.raises(ValueError, match=r"training mode.*\.eval\(\)"):
        float_convbn_to_conv(traced)
    traced.eval()
    traced.bn.train()
    with pytest.raises(ValueError, match=r"BatchNorm 'bn' is in training mode"):
        float_convbn_to_conv(traced)


def test_float_fusion_requires_graph_module():
    with pytest.raises(TypeError, match="symbolic_trace"):
        float_convbn_to_conv(_LayerThenBN(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)).eval())


def weight_qconfig(channels: int) -> QConfig:
    activation = _LearnableFakeQuantize.with_args(
        observer=tq.HistogramObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
        qscheme=torch.per_tensor_affine, scale=1.0, zero_point=0.0, use_grad_scaling=True,
    )
    weight = _LearnableFakeQuantize.with_args(
        observer=tq.PerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric, scale=0.1, zero_point=0.0, use_grad_scaling=True,
        channel_len=channels,
    )
    return QConfig(activation=activation, weight=weight)


@pytest.fixture(scope="module")
def resnet18_qat():
    """(float eval model, prepare_qat_fx'd model in eval mode) like the SA tutorial."""
    torch.manual_seed(0)
    model = randomize_batchnorms(torchvision.models.resnet18()).eval()
    mapping = QConfigMapping()
    for name, module in model.named_modules():
        if hasattr(module, "out_channels"):
            mapping.set_module_name(name, weight_qconfig(module.out_channels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prepared = prepare_qat_fx(copy.deepcopy(model), mapping, (torch.randn(1, 3, 32, 32),))
    prepared.eval()
    return model, prepared


FUSED_QAT_TYPES = (
    nniqat.ConvBn1d, nniqat.ConvBn2d, nniqat.ConvBn3d, nniqat.LinearBn1d,
)


def test_qat_convbn_to_conv_resnet18(resnet18_qat):
    model, prepared = resnet18_qat
    prepared = copy.deepcopy(prepared)
    fused = {n: m for n, m in prepared.named_modules() if isinstance(m, FUSED_QAT_TYPES)}
    assert len(fused) == 20
    fake_quants = {n: m.weight_fake_quant for n, m in fused.items()}
    qconfigs = {n: m.qconfig for n, m in fused.items()}
    # The weight each fused module hands its fake quantizer: W * gamma / sqrt(var + eps).
    seen_weights = {
        n: m.weight * (m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)).reshape(-1, 1, 1, 1)
        for n, m in fused.items()
    }
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prepared.apply(tq.disable_fake_quant)
    prepared.apply(tq.disable_observer)
    with torch.no_grad():
        reference = prepared(x)

    converted = convbn_to_conv(prepared, inplace=True)

    assert converted is prepared
    assert not any(isinstance(m, FUSED_QAT_TYPES) for m in converted.modules())
    assert not has_batchnorm(converted)
    for name in fused:
        module = converted.get_submodule(name)
        with_relu = isinstance(fused[name], nniqat.ConvBnReLU2d)
        assert type(module) is (nniqat.ConvReLU2d if with_relu else nnqat.Conv2d), name
        assert module.weight_fake_quant is fake_quants[name]
        assert module.qconfig is qconfigs[name]
        assert not module.training
        torch.testing.assert_close(module.weight, seen_weights[name], rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        out = converted(x)
        float_out = model(x)
    assert rel_err(out, reference) < 1e-5
    assert rel_err(out, float_out) < 1e-5


def test_qat_convbn_to_conv_copies_by_default(resnet18_qat):
    _, prepared = resnet18_qat
    converted = qat_convbn_to_conv(prepared)
    assert isinstance(prepared.layer1.get_submodule("0").conv2, nniqat.ConvBn2d)
    new = converted.layer1.get_submodule("0").conv2
    old = prepared.layer1.get_submodule("0").conv2
    assert isinstance(new, nnqat.Conv2d)
    assert new.weight_fake_quant is not old.weight_fake_quant
    assert torch.equal(new.weight_fake_quant.scale, old.weight_fake_quant.scale)


def test_qat_convbn_to_conv_requires_eval_mode(resnet18_qat):
    _, prepared = resnet18_qat
    prepared = copy.deepcopy(prepared)
    prepared.train()
    with pytest.raises(ValueError, match=r"the model is in training mode.*fx_model\.eval\(\)"):
        qat_convbn_to_conv(prepared)
    prepared.eval()
    prepared.layer2.get_submodule("1").conv1.update_bn_stats()
    with pytest.raises(ValueError, match=r"'layer2\.1\.conv1' is in training mode"):
        qat_convbn_to_conv(prepared)


@pytest.mark.parametrize(
    ("fused_type", "plain_type", "shape"),
    [
        (nniqat.ConvBn1d, nnqat.Conv1d, (2, 4, 9)),
        (nniqat.ConvBnReLU1d, nniqat.ConvReLU1d, (2, 4, 9)),
        (nniqat.ConvBnReLU2d, nniqat.ConvReLU2d, (2, 4, 7, 7)),
        (nniqat.ConvBn3d, nnqat.Conv3d, (2, 4, 5, 5, 5)),
        (nniqat.ConvBnReLU3d, nniqat.ConvReLU3d, (2, 4, 5, 5, 5)),
        (nniqat.LinearBn1d, nnqat.Linear, (3, 4)),
    ],
)
def test_qat_convbn_to_conv_module_kinds(fused_type, plain_type, shape):
    torch.manual_seed(0)
    if fused_type is nniqat.LinearBn1d:
        module = fused_type(4, 6, qconfig=weight_qconfig(6))
    else:
        module = fused_type(4, 6, 3, padding=1, bias=False, qconfig=weight_qconfig(6))
    model = randomize_batchnorms(nn.Sequential(module)).eval()
    model.apply(tq.disable_fake_quant)
    model.apply(tq.disable_observer)
    x = torch.randn(shape)
    with torch.no_grad():
        reference = model(x)
        converted = qat_convbn_to_conv(model)
        out = converted(x)
    assert type(converted[0]) is plain_type
    assert rel_err(out, reference) < 1e-5


def test_qat_convbn_to_conv_matches_with_fake_quant_enabled():
    """The weight fake quantizer sees the same (folded) weight before and after the swap."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)  # torch's default qconfig uses reduce_range
        from torch.ao.quantization import get_default_qat_qconfig_mapping

        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)
        )
        prepared = prepare_qat_fx(
            randomize_batchnorms(model).train(),
            get_default_qat_qconfig_mapping("fbgemm"),
            (torch.randn(1, 3, 8, 8),),
        )
    for _ in range(3):  # calibrate observers and BN statistics
        prepared(torch.randn(8, 3, 8, 8))
    prepared.eval()
    prepared.apply(tq.disable_observer)
    converted = qat_convbn_to_conv(prepared)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(converted(x), prepared(x)) < 1e-5
