"""Module-apply toggles on our fake-quant modules and on torch.ao's, inside a model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from eqcore import disable_fake_quant, disable_PTQ_observer, enable_fake_quant, enable_param_learning, enable_PTQ_observer
from eqcore._torch_ao import FakeQuantizeBase, _LearnableFakeQuantize, tq
from eqcore.quant.modules import EQFakeQuantize, EQLearnableFakeQuantize

KINDS = {
    "EQLearnableFakeQuantize": EQLearnableFakeQuantize,
    "EQFakeQuantize": EQFakeQuantize,
    "torch FakeQuantize": tq.FakeQuantize,
    "torch _LearnableFakeQuantize": _LearnableFakeQuantize,
}
LEARNABLE = (EQLearnableFakeQuantize, _LearnableFakeQuantize)


def make(kind: str) -> FakeQuantizeBase:
    return KINDS[kind](observer=tq.MinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8)


def model_with(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), make(kind), nn.ReLU(), nn.Linear(4, 3), make(kind))


def qparams(fq: FakeQuantizeBase) -> tuple[torch.Tensor, torch.Tensor]:
    return fq.scale.detach().clone(), fq.zero_point.detach().clone()


def expected_minmax_qparams(*xs: torch.Tensor) -> tuple[float, int]:
    """quint8 0..255 min/max qparams, computed here: s = (max(hi,0) - min(lo,0)) / 255, z = -round(lo/s)."""
    data = torch.cat([x.reshape(-1) for x in xs])
    lo, hi = min(float(data.min()), 0.0), max(float(data.max()), 0.0)
    scale = (hi - lo) / 255
    return scale, int(min(max(-round(lo / scale), 0), 255))


@pytest.mark.parametrize("kind", KINDS)
def test_disable_and_enable_fake_quant(kind: str) -> None:
    fq = make(kind)
    x = torch.linspace(-1.3, 2.9, 37)
    fq(x)  # calibrate
    fq.apply(disable_PTQ_observer)
    fq.apply(disable_fake_quant)
    assert torch.equal(fq(x), x)
    assert int(fq.fake_quant_enabled[0]) == 0
    fq.apply(enable_fake_quant)
    y = fq(x)
    scale, zero_point = qparams(fq)
    want = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), 0, 255)
    assert torch.equal(y, want) and not torch.equal(y, x)
    assert int(fq.fake_quant_enabled[0]) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_enable_ptq_observer_makes_qparams_follow_the_data(kind: str) -> None:
    fq = make(kind)
    fq.apply(disable_PTQ_observer)
    if isinstance(fq, LEARNABLE):
        fq.enable_param_learning()
    fq.apply(enable_PTQ_observer)
    if isinstance(fq, LEARNABLE):  # the seeds' toggle: only the observer switches, the observer wins
        assert int(fq.static_enabled[0]) == 1
        assert fq.scale.requires_grad and fq.zero_point.requires_grad
    else:
        assert int(fq.observer_enabled[0]) == 1
    x1, x2 = torch.linspace(-1.0, 3.0, 9), torch.linspace(-4.0, 6.0, 5)
    for seen in ((x1,), (x1, x2)):
        fq(seen[-1])
        scale, zero_point = qparams(fq)
        want_scale, want_zp = expected_minmax_qparams(*seen)
        assert float(scale) == pytest.approx(want_scale, rel=1e-6)
        assert int(zero_point) == want_zp


@pytest.mark.parametrize("kind", KINDS)
def test_disable_ptq_observer_freezes_qparams(kind: str) -> None:
    fq = make(kind)
    fq(torch.linspace(-1.0, 3.0, 9))
    frozen = qparams(fq)
    observer_state = copy.deepcopy(fq.activation_post_process.state_dict())
    fq.apply(disable_PTQ_observer)
    x = torch.linspace(-40.0, 60.0, 11)
    y = fq(x)
    assert torch.equal(qparams(fq)[0], frozen[0]) and torch.equal(qparams(fq)[1], frozen[1])
    for key, value in fq.activation_post_process.state_dict().items():
        assert torch.equal(value, observer_state[key]), key
    assert float(y.detach().max()) == pytest.approx(float(frozen[0]) * (255 - float(frozen[1])))  # clamped by old qparams
    assert int((fq.static_enabled if isinstance(fq, LEARNABLE) else fq.observer_enabled)[0]) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_enable_param_learning_toggle(kind: str) -> None:
    fq = make(kind)
    fq(torch.linspace(-1.0, 3.0, 9))
    fq.apply(enable_param_learning)
    if isinstance(fq, LEARNABLE):
        assert (int(fq.learning_enabled[0]), int(fq.static_enabled[0]), int(fq.fake_quant_enabled[0])) == (1, 0, 1)
        x = torch.linspace(-5.0, 5.0, 11)
        fq(x).sum().backward()
        assert fq.scale.grad is not None
    else:  # not learnable: left as it was
        assert int(fq.observer_enabled[0]) == 1 and int(fq.fake_quant_enabled[0]) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_toggles_apply_to_a_whole_model_and_leave_other_modules_alone(kind: str) -> None:
    """The seed's sequence: enable fake quant + PTQ observer, calibrate, freeze, then pass-through."""
    model = model_with(kind)
    linear_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("1.", "4."))}
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    for toggle in (enable_fake_quant, enable_PTQ_observer):
        assert model.apply(toggle) is model
        assert toggle(nn.Linear(2, 2)) is None  # no-ops on other modules
    calibrated_out = model(x)
    quantizers = [model[1], model[4]]
    assert all(float(q.scale.detach().reshape(-1)[0]) != 1.0 for q in quantizers)  # the observers ran
    model.apply(disable_PTQ_observer)
    frozen = [qparams(q) for q in quantizers]
    assert torch.equal(model(x), calibrated_out)  # same data, frozen qparams: same output
    model(x * 10)
    assert all(torch.equal(qparams(q)[0], f[0]) for q, f in zip(quantizers, frozen))
    model.apply(disable_fake_quant)
    float_model = nn.Sequential(model[0], model[2], model[3])
    assert torch.equal(model(x), float_model(x))
    for key, value in model.state_dict().items():
        if key in linear_state:
            assert torch.equal(value, linear_state[key]), key


def test_toggle_state_survives_state_dict_round_trip() -> None:
    model = model_with("EQLearnableFakeQuantize")
    model(torch.randn(3, 4))
    model.apply(disable_fake_quant)
    model.apply(disable_PTQ_observer)
    fresh = model_with("EQLearnableFakeQuantize")
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(fresh[1](x), x)  # fake quant off came with the buffers
    scale = fresh[1].scale.detach().clone()
    fresh[1].enable_fake_quant()
    fresh[1](x * 100)
    assert torch.equal(fresh[1].scale.detach(), scale)  # observer off came with the buffers


@pytest.mark.parametrize("kind", ["EQLearnableFakeQuantize", "torch _LearnableFakeQuantize"])
def test_ptq_observer_toggles_keep_every_parameter_trainable_as_in_the_seeds(kind: str) -> None:
    """The SA tutorial calibrates with enable_PTQ_observer, turns it off, backpropagates and then
    asserts every parameter of the model has a .grad: the toggles must not touch requires_grad."""
    model = model_with(kind)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    model.apply(enable_fake_quant)
    model.apply(enable_PTQ_observer)
    with torch.no_grad():
        model(x)
    model.apply(disable_PTQ_observer)
    model(x).mean().backward()
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not missing, f"no .grad after backward: {missing}"
