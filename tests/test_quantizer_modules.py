"""EQLearnableFakeQuantize / EQFakeQuantize as torch.ao drop-ins: QAT on resnet18, state dicts, modes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import eqcore.quant.functional as functional
import eqcore.quant.kernels as kernels
from eqcore import disable_PTQ_observer, enable_fake_quant, enable_PTQ_observer
from eqcore._torch_ao import (
    FakeQuantizeBase,
    QConfig,
    QConfigMapping,
    _LearnableFakeQuantize,
    prepare_qat_fx,
    tq,
)
from eqcore.quant.functional import EPS, fake_quantize, learnable_fake_quantize
from eqcore.quant.modules import EQFakeQuantize, EQLearnableFakeQuantize


def seed_qconfig_model(learnable_cls, act_observer=tq.HistogramObserver) -> torch.fx.GraphModule:  # noqa: ANN001
    """The SA tutorial's qconfig loop, verbatim apart from the class (and optionally the
    activation observer), on a seeded resnet18."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    learnable_weight = lambda channels: learnable_cls.with_args(  # noqa: E731
        observer=tq.PerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        scale=0.1,
        zero_point=0.0,
        use_grad_scaling=True,
        channel_len=channels,
    )
    learnable_act = learnable_cls.with_args(
        observer=act_observer,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
        scale=1.0,
        zero_point=0.0,
        use_grad_scaling=True,
    )
    torch.backends.quantized.engine = "fbgemm"
    qconfig_mapping = QConfigMapping()
    for name, module in model.named_modules():
        if hasattr(module, "out_channels"):
            qconfig = tq.QConfig(
                activation=learnable_act,
                weight=learnable_weight(channels=module.out_channels),
            )
            qconfig_mapping.set_module_name(name, qconfig)
            module.qconfig = qconfig
    example_inputs = (torch.randn(1, 3, 224, 224),)
    model.eval()
    with warnings.catch_warnings():  # torch.ao's own deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        return prepare_qat_fx(model, qconfig_mapping, example_inputs)


def image_batch(size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_seed_qconfig_loop_resnet18_qat_forward_backward() -> None:
    """prepare_qat_fx accepts our class in the seed's loop; PTQ then QAT forward and backward run."""
    model = seed_qconfig_model(EQLearnableFakeQuantize)
    quantizers = [m for m in model.modules() if isinstance(m, EQLearnableFakeQuantize)]
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 20
    assert all(isinstance(conv.weight_fake_quant, EQLearnableFakeQuantize) for conv in convs.values())
    assert len(quantizers) > len(convs)  # activations too
    x = image_batch()
    model.apply(enable_fake_quant)
    model.apply(enable_PTQ_observer)
    model(x).mean().backward()
    for name, conv in convs.items():
        assert conv.weight.grad is not None and bool(torch.isfinite(conv.weight.grad).all()), name
        assert bool(conv.weight.grad.abs().sum() > 0), name
        # The observer set per-channel scales, one per output channel (PTQ mode).
        q = conv.weight_fake_quant
        assert q.scale.shape == (conv.out_channels,)
        expected_scale, _ = q.activation_post_process.calculate_qparams()
        assert torch.equal(q.scale.detach(), expected_scale)
    # QAT: learn the qparams; every quantizer's scale gets a finite gradient, observers freeze.
    model.apply(disable_PTQ_observer)
    model.zero_grad()
    for q in quantizers:
        q.enable_param_learning()
    before = [q.scale.detach().clone() for q in quantizers]
    model(x).mean().backward()
    for q, scale in zip(quantizers, before):
        assert q.scale.grad is not None and bool(torch.isfinite(q.scale.grad).all())
        assert torch.equal(q.scale.detach(), scale)
    assert any(bool(q.scale.grad.abs().sum() > 0) for q in quantizers)


def test_qat_step_on_resnet18_with_weights_keeping_their_factor_of_ds() -> None:
    """In QAT every conv weight (scaled by its folded batch norm) is quantized per channel, so its
    quantizer keeps the factor of dS from the forward. A training step gives the gradients of the
    backward that recomputes from x: every parameter's bit for bit, but the weight quantizers'
    scales within float32 summation error (the factor sums their dS in one pass)."""
    from fq_kernels import kernel_path

    x = image_batch(32)
    grads = {}
    factors = []
    keeping = functional._fake_quantize_keeping_factor

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        factors.append(args[0].shape)
        return keeping(*args, **kwargs)

    for path in ("host", "recompute"):
        model = seed_qconfig_model(EQLearnableFakeQuantize, tq.MovingAverageMinMaxObserver)
        model.apply(enable_fake_quant)
        model.apply(enable_PTQ_observer)
        with torch.no_grad():
            model(x)
        model.apply(disable_PTQ_observer)
        for module in model.modules():
            if isinstance(module, EQLearnableFakeQuantize):
                module.enable_param_learning()
        with kernel_path(path):
            functional._fake_quantize_keeping_factor = counted
            try:
                model(x).square().mean().backward()
            finally:
                functional._fake_quantize_keeping_factor = keeping
        grads[path] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert len(factors) == 20  # every conv weight (conv and batch norm folded), on the host path only
    assert grads["host"].keys() == grads["recompute"].keys()
    weight_scales = {name for name in grads["host"] if name.endswith("weight_fake_quant.scale")}
    assert len(weight_scales) == 20
    for name, got in grads["host"].items():
        want = grads["recompute"][name]
        if name in weight_scales:
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), name
        else:
            assert torch.equal(got, want), name


def test_seed_qconfig_loop_resnet18_matches_torch_learnable() -> None:
    """The same prepared model with torch's _LearnableFakeQuantize: bit-identical logits and qparams.

    Forward only (torch's CPU learnable backward over 11M weights takes seconds; the gradients
    are compared with torch's kernels function by function in test_quantizers.py), and min/max
    activation observers (HistogramObserver's search costs ~0.1 s per quantizer and call).
    """
    ours = seed_qconfig_model(EQLearnableFakeQuantize, tq.MovingAverageMinMaxObserver)
    theirs = seed_qconfig_model(_LearnableFakeQuantize, tq.MovingAverageMinMaxObserver)
    x = image_batch(32)
    for model in (ours, theirs):
        model.apply(enable_fake_quant)
        model.apply(enable_PTQ_observer)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        ours.apply(disable_PTQ_observer)
        theirs.apply(disable_PTQ_observer)
        assert torch.equal(ours(x * 2), theirs(x * 2))  # frozen qparams, now clamping more
    theirs_modules = dict(theirs.named_modules())
    for name, module in ours.named_modules():
        if isinstance(module, EQLearnableFakeQuantize):
            assert torch.equal(module.scale, theirs_modules[name].scale), name
            assert torch.equal(module.zero_point, theirs_modules[name].zero_point), name


def test_seed_qconfig_loop_with_eq_fake_quantize_matches_torch_fake_quantize() -> None:
    def build(cls):  # noqa: ANN001, ANN202
        torch.manual_seed(0)
        model = torchvision.models.resnet18().eval()
        act = cls.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8)
        mapping = QConfigMapping()
        for name, module in model.named_modules():
            if hasattr(module, "out_channels"):
                weight = cls.with_args(
                    observer=tq.PerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                    dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                )
                qconfig = QConfig(activation=act, weight=weight)
                mapping.set_module_name(name, qconfig)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return prepare_qat_fx(model, mapping, (torch.randn(1, 3, 64, 64),))

    ours, theirs = build(EQFakeQuantize), build(tq.FakeQuantize)
    assert sum(isinstance(m, EQFakeQuantize) for m in ours.modules()) > 20
    x = image_batch()
    out_ours, out_theirs = ours(x), theirs(x)
    assert torch.equal(out_ours, out_theirs)
    out_ours.sum().backward()
    out_theirs.sum().backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, theirs_params[name].grad, rtol=1e-5, atol=1e-7)


LEARNABLE_CONFIGS = [
    dict(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8),
    dict(observer=tq.PerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
         qscheme=torch.per_channel_symmetric, ch_axis=0, channel_len=4),
]


def _configure(module: FakeQuantizeBase, mode: str) -> None:
    if mode == "learning":
        module.enable_param_learning()
    elif mode == "observation":
        module.enable_static_observation()
    elif mode == "no_fake_quant":
        module.disable_fake_quant()


@pytest.mark.parametrize("kwargs", LEARNABLE_CONFIGS)
@pytest.mark.parametrize("mode", ["static", "learning", "observation", "no_fake_quant"])
def test_learnable_state_dict_matches_torch_both_ways(kwargs: dict, mode: str) -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 6) * 3
    for source_cls, target_cls in ((_LearnableFakeQuantize, EQLearnableFakeQuantize), (EQLearnableFakeQuantize, _LearnableFakeQuantize)):
        source, target = source_cls(**kwargs), target_cls(**kwargs)
        assert list(source.state_dict()) == list(target.state_dict())
        source(x)  # observe: non-default qparams and observer state
        _configure(source, mode)
        state = source.state_dict()
        target.load_state_dict(state)
        for key, value in target.state_dict().items():
            assert torch.equal(value, state[key]), key
        # The loaded buffers drive behaviour: both modules now act the same on new data.
        x2 = torch.randn(4, 6) * 7 + 1
        assert torch.equal(target(x2), source(x2))
        assert torch.equal(target.scale.detach(), source.scale.detach())
        assert torch.equal(target.zero_point.detach(), source.zero_point.detach())


def test_loaded_flags_drive_our_forward() -> None:
    """After load_state_dict, our Python-side mode flags follow the loaded uint8 buffers."""
    theirs = _LearnableFakeQuantize(observer=tq.MinMaxObserver, quant_min=0, quant_max=255)
    theirs(torch.linspace(-1, 3, 50))
    theirs.enable_static_observation()  # fake quant off, observer on
    ours = EQLearnableFakeQuantize(observer=tq.MinMaxObserver, quant_min=0, quant_max=255)
    ours.load_state_dict(theirs.state_dict())
    x = torch.linspace(-10, 10, 7)
    assert ours(x) is x
    assert float(ours.activation_post_process.min_val) == -10.0  # observer ran
    theirs.enable_param_learning()  # fake quant on, observer off
    ours.load_state_dict(theirs.state_dict())
    scale = ours.scale.detach().clone()
    y = ours(torch.linspace(-100, 100, 9))
    assert torch.equal(ours.scale.detach(), scale)  # frozen
    assert float(y.detach().max()) == pytest.approx(float(scale) * (255 - float(ours.zero_point.detach())))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8),
        dict(observer=tq.PerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
             qscheme=torch.per_channel_affine, ch_axis=1),
    ],
)
def test_fake_quantize_state_dict_matches_torch_both_ways(kwargs: dict) -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 5, 2) * 2
    for source_cls, target_cls in ((tq.FakeQuantize, EQFakeQuantize), (EQFakeQuantize, tq.FakeQuantize)):
        source, target = source_cls(**kwargs), target_cls(**kwargs)
        assert list(source.state_dict()) == list(target.state_dict())
        source(x)
        source.disable_observer()
        state = source.state_dict()
        target.load_state_dict(state)  # per-channel: the scale buffer is resized on load
        for key, value in target.state_dict().items():
            assert torch.equal(value, state[key]) and value.dtype == state[key].dtype, key
        x2 = torch.randn(3, 5, 2) * 5
        assert torch.equal(target(x2), source(x2))
        assert torch.equal(target.scale, source.scale)  # observer stayed off after loading
        source.disable_fake_quant()
        target.load_state_dict(source.state_dict())
        assert torch.equal(target(x2), x2)


def test_with_args_builds_configured_modules() -> None:
    factory = EQLearnableFakeQuantize.with_args(
        observer=tq.PerChannelMinMaxObserver, quant_min=-8, quant_max=7, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric, ch_axis=0, channel_len=3, scale=0.5, use_grad_scaling=True,
    )
    a, b = factory(), factory()
    assert a is not b and a.scale is not b.scale
    assert (a.quant_min, a.quant_max, a.qscheme, a.ch_axis, a.use_grad_scaling) == (-8, 7, torch.per_channel_symmetric, 0, True)
    assert a.scale.tolist() == [0.5, 0.5, 0.5] and a.zero_point.tolist() == [0.0, 0.0, 0.0]
    assert isinstance(a.activation_post_process, tq.PerChannelMinMaxObserver)
    assert a.activation_post_process.quant_max == 7
    plain = EQFakeQuantize.with_args(observer=tq.MinMaxObserver, quant_min=0, quant_max=15)()
    assert (plain.quant_min, plain.quant_max, plain.activation_post_process.quant_max) == (0, 15, 15)


def test_calculate_qparams_rounds_half_even_and_clamps() -> None:
    module = EQLearnableFakeQuantize(observer=tq.MinMaxObserver, quant_min=0, quant_max=255, channel_len=-1)
    for raw, expected in ((2.5, 2), (3.5, 4), (-0.5, 0), (-7.2, 0), (300.0, 255), (254.6, 255), (17.0, 17)):
        module.zero_point.data.fill_(raw)
        module.scale.data.fill_(0.25)
        scale, zero_point = module.calculate_qparams()
        assert zero_point.dtype == torch.long and zero_point.tolist() == [expected], raw
        assert scale.tolist() == [0.25]
    module.scale.data.fill_(-1.0)
    assert module.calculate_qparams()[0].tolist() == [EPS]


def test_static_estimate_scale_follows_the_observer() -> None:
    """MinMaxObserver, quint8 0..255: scale = (max - min) / 255, z = -round(min / scale) (computed here)."""
    module = EQLearnableFakeQuantize(observer=tq.MinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8)
    module.enable_static_estimate()
    x = torch.tensor([-1.0, 0.2, 2.0, 3.0])
    y = module(x)
    scale = 4.0 / 255
    zero_point = round(1.0 / scale)  # 63.75 -> 64
    assert float(module.scale) == pytest.approx(scale, rel=1e-6)
    assert float(module.zero_point) == zero_point
    expected = torch.fake_quantize_per_tensor_affine(x, float(module.scale), zero_point, 0, 255)
    assert torch.equal(y, expected)
    module(torch.tensor([-3.0, 5.0]))  # the range grows: the scale follows
    assert float(module.scale) == pytest.approx(8.0 / 255, rel=1e-6)


@pytest.mark.parametrize("kwargs", LEARNABLE_CONFIGS)
def test_enable_param_learning_trains_qparams_and_freezes_observer(kwargs: dict) -> None:
    torch.manual_seed(3)
    module = EQLearnableFakeQuantize(**kwargs)
    module(torch.randn(4, 6))  # calibrate
    observer_state = {k: v.clone() for k, v in module.activation_post_process.state_dict().items()}
    module.enable_param_learning()
    assert module.scale.requires_grad and module.zero_point.requires_grad
    before = (module.scale.detach().clone(), module.zero_point.detach().clone())
    x = torch.randn(4, 6) * 10  # wider than calibration: clamping, so dS and dZ are nonzero
    (module(x) - x).pow(2).mean().backward()
    assert module.scale.grad is not None and bool(module.scale.grad.abs().sum() > 0)
    if module.qscheme == torch.per_tensor_affine:
        assert module.zero_point.grad is not None and bool(module.zero_point.grad.abs().sum() > 0)
    torch.optim.SGD(module.parameters(), lr=1e-4).step()
    assert not torch.equal(module.scale.detach(), before[0]) and bool((module.scale > 0).all())
    for key, value in module.activation_post_process.state_dict().items():
        assert torch.equal(value, observer_state[key]), f"observer updated in learning mode: {key}"
    # The forward uses the trained parameters, not the observer's.
    trained = module.scale.detach().clone()
    module(torch.randn(4, 6) * 50)
    assert torch.equal(module.scale.detach(), trained)


def test_enable_static_observation_returns_input_and_observes() -> None:
    module = EQLearnableFakeQuantize(observer=tq.MinMaxObserver, quant_min=0, quant_max=255)
    module.enable_static_observation()
    x = torch.randn(10) * 5
    y = module(x)
    assert torch.equal(y, x)
    assert float(module.activation_post_process.min_val) == float(x.min())
    assert float(module.activation_post_process.max_val) == float(x.max())
    observed_scale, _ = module.activation_post_process.calculate_qparams()
    assert torch.equal(module.scale.detach(), observed_scale)


@pytest.mark.parametrize("qscheme", [torch.per_tensor_symmetric, torch.per_channel_symmetric])
def test_symmetric_module_keeps_zero_point_zero(qscheme: torch.qscheme) -> None:
    """Symmetric => z = 0 and dZ = 0 (DESIGN.md section 4), through training steps too."""
    per_channel = qscheme == torch.per_channel_symmetric
    module = EQLearnableFakeQuantize(
        observer=tq.PerChannelMinMaxObserver if per_channel else tq.MinMaxObserver,
        quant_min=-8, quant_max=7, dtype=torch.qint8, qscheme=qscheme, zero_point=3.0,
        channel_len=3 if per_channel else -1, **({"ch_axis": 0} if per_channel else {}),
    )
    assert bool((module.zero_point == 0).all())
    torch.manual_seed(4)
    module(torch.randn(3, 10))  # calibrate (static)
    assert bool((module.zero_point == 0).all())
    module.enable_param_learning()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        x = torch.randn(3, 10) * 20  # mostly clamped: torch-style dZ would be large
        y = module(x)
        assert torch.equal(y, fake_quantize(x, module.scale.detach(), torch.zeros_like(module.scale), -8, 7, ch_axis=0 if per_channel else None))
        y.sum().backward()
        grad = module.zero_point.grad
        # Every parameter gets a .grad, as with torch's module (the seeds assert it); z's is 0.
        assert grad is not None and bool((grad == 0).all()), f"symmetric quantizer got dZ = {grad}"
        reference_scale = module.scale.detach().clone().requires_grad_(True)
        learnable_fake_quantize(x, reference_scale, torch.zeros_like(reference_scale), -8, 7,
                                ch_axis=0 if per_channel else None).sum().backward()
        assert torch.equal(module.scale.grad, reference_scale.grad)
        optimizer.step()
        assert bool((module.zero_point == 0).all())
        assert bool((module.calculate_qparams()[1] == 0).all())


@pytest.mark.parametrize("cls", [EQLearnableFakeQuantize, EQFakeQuantize])
def test_lazy_per_channel_sizing(cls) -> None:  # noqa: ANN001
    """channel_len=-1 with a per-channel observer: the qparams take the observed channel count."""
    module = cls(
        observer=tq.PerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric, ch_axis=1,
    )
    assert module.scale.numel() == 1
    x = torch.randn(2, 5, 3) * torch.arange(1.0, 6.0).reshape(1, 5, 1)
    y = module(x)
    assert module.scale.shape == (5,)
    amax = x.abs().amax(dim=(0, 2))
    torch.testing.assert_close(module.scale.detach(), amax / 127.5, rtol=1e-6, atol=0)
    expected = torch.fake_quantize_per_channel_affine(x, module.scale.detach(), torch.zeros(5, dtype=torch.int32), 1, -128, 127)
    assert torch.equal(y.detach(), expected)
    if cls is EQLearnableFakeQuantize:  # and the parameters stay trainable at the new size
        module.enable_param_learning()
        module(x).sum().backward()
        assert module.scale.grad.shape == (5,)


FORBIDDEN = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


def _no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str):  # noqa: ANN202
        def call(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            raise AssertionError(f"host synchronisation: Tensor.{name} called")
        return call

    for name in FORBIDDEN:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


@pytest.mark.parametrize(("shape", "ch_axis"), [((6, 5), None), ((3, 4, 2), 1), ((3, 4, 2), -1), ((5,), 0)])
def test_no_host_sync_in_forward_and_backward(monkeypatch: pytest.MonkeyPatch, shape, ch_axis) -> None:  # noqa: ANN001
    torch.manual_seed(5)
    x = (torch.randn(shape) * 4).requires_grad_(True)
    channels = 1 if ch_axis is None else shape[ch_axis]
    scale = (torch.rand(channels) + 0.1).requires_grad_(True)
    zero_point = torch.randint(-3, 3, (channels,)).float().requires_grad_(True)
    module = EQLearnableFakeQuantize(
        observer=tq.PerChannelMinMaxObserver if ch_axis is not None else tq.MinMaxObserver,
        quant_min=-8, quant_max=7, dtype=torch.qint8,
        qscheme=torch.per_channel_affine if ch_axis is not None else torch.per_tensor_affine,
        channel_len=channels if ch_axis is not None else -1, use_grad_scaling=True,
        **({"ch_axis": ch_axis} if ch_axis is not None else {}),
    ).enable_param_learning()
    with monkeypatch.context() as patch:
        # The kernels as on a GPU: on the CPU they may read values (host memory, no sync).
        patch.setattr(kernels, "_reads_host", lambda t: False)
        _no_host_sync(patch)
        with pytest.raises(AssertionError, match="host synchronisation"):
            torch.ones(1).item()  # the patch bites
        y = learnable_fake_quantize(x, scale, zero_point, -8, 7, ch_axis=ch_axis, grad_factor=0.5)
        dx, ds, dz = torch.autograd.grad(y.sum(), (x, scale, zero_point))
        y2 = fake_quantize(x, scale.detach(), zero_point.detach(), -8, 7, ch_axis=ch_axis)
        (dx2,) = torch.autograd.grad(y2.sum(), x)
        y3 = module(x)  # learning mode: no observer, no sync
        y3.sum().backward()
    assert ds.shape == (channels,) and dz.shape == (channels,)
    assert torch.equal(y.detach(), y2) and torch.equal(dx, dx2)
    assert module.scale.grad is not None
