"""The compile path: fake quantization under torch.compile (inductor) against the eager kernels.

Forward and dX must be bit-identical to eager, dS and dZ equal within float32 summation error;
the modules must trace without a graph break, and a compiled QAT step of a small model must do
what the eager one does. Compiling costs seconds, so the functions compile once with dynamic
shapes and the property test draws a bounded number of cases.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from eqcore._torch_ao import tq
from eqcore.quant.functional import fake_quantize, learnable_fake_quantize
from eqcore.quant.modules import EQFakeQuantize, EQLearnableFakeQuantize
from eqcore.testing import check_fake_quantize
from pytest_easyquant.strategies import FakeQuantCase, fake_quant_cases

INF, NAN = math.inf, math.nan


def _learnable(x, scale, zero_point, quant_min, quant_max, ch_axis, grad_factor):  # noqa: ANN001, ANN202
    return learnable_fake_quantize(x, scale, zero_point, quant_min, quant_max, ch_axis=ch_axis, grad_factor=grad_factor)


_compiled_learnable = torch.compile(_learnable, dynamic=True, fullgraph=True)


@pytest.fixture(autouse=True)
def _recompiles() -> Iterator[None]:
    """Each dtype, rank and channel axis is a graph of its own: let all of them compile."""
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096):
        yield


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so that equality also compares signs of zero and NaN payloads."""
    ints = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return t.contiguous().view(ints[t.dtype])


def _run(fn, case: FakeQuantCase, grad_y: torch.Tensor):  # noqa: ANN001, ANN202
    x = case.x.detach().clone().requires_grad_()
    scale = case.scale.detach().clone().requires_grad_()
    zero_point = case.zero_point.detach().clone().requires_grad_()
    axis = None if case.ch_axis is None else case.ch_axis % case.x.dim()
    y = fn(x, scale, zero_point, case.quant_min, case.quant_max, axis, case.grad_factor)
    grads = torch.autograd.grad(y, (x, scale, zero_point), grad_y)
    return (y.detach(), *grads)


def assert_matches_eager(case: FakeQuantCase, grad_y: torch.Tensor | None = None) -> None:
    """Compiled vs eager on one case: y and dX to the bit, dS and dZ to float32 summation error."""
    if grad_y is None:
        grad_y = torch.linspace(-1, 1, case.x.numel(), dtype=case.x.dtype).reshape(case.x.shape)
    eager = _run(_learnable, case, grad_y)
    compiled = _run(_compiled_learnable, case, grad_y)
    for name, a, b in zip(("y", "dX"), eager[:2], compiled[:2]):
        assert a.dtype == b.dtype, name
        assert torch.equal(_bits(a), _bits(b)), f"{name} differs from eager: {a} vs {b}"
    count = max(1, case.x.numel())
    for name, a, b in zip(("dS", "dZ"), eager[2:], compiled[2:]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        magnitude = (grad_y.double().abs().sum() * (case.quant_max - case.quant_min + 1)).item()
        tolerance = 8 * torch.finfo(torch.float32).eps * math.sqrt(count) * magnitude * abs(case.grad_factor) + 1e-12
        torch.testing.assert_close(b.double(), a.double(), rtol=1e-6, atol=tolerance, equal_nan=True, msg=name)


@pytest.mark.slow
@settings(max_examples=40)
@given(case=fake_quant_cases(dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16)))
def test_compiled_matches_eager_on_drawn_cases(case: FakeQuantCase) -> None:
    assert_matches_eager(case)


@pytest.mark.slow
@settings(max_examples=15)
@given(case=fake_quant_cases())
def test_compiled_passes_the_property_checker(case: FakeQuantCase) -> None:
    case.check(_compiled_learnable)


def _case(x, scale, zero_point, qmin=0, qmax=255, ch_axis=None, grad_factor=1.0, dtype=torch.float32) -> FakeQuantCase:  # noqa: ANN001
    return FakeQuantCase(
        torch.tensor(x, dtype=dtype),
        torch.tensor(scale, dtype=torch.float32),
        torch.tensor(zero_point, dtype=torch.float32),
        qmin, qmax, ch_axis, grad_factor,
    )


EDGE_CASES = {
    "ties round half to even": _case([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5], [1.0], [0.0], -128, 127),
    "NaN, inf and signed zeros": _case([NAN, -NAN, INF, -INF, -0.0, 0.0, -0.01, 300.0], [0.1], [3.0]),
    "zero point rounded and clamped": _case([[-3.0, 0.0, 1.0], [2.5, 7.0, 9.0]], [0.5], [-4.6], 0, 15),
    "negative zero point inside a signed range": _case([-3.0, -1.0, 0.0, 2.0], [0.25], [-2.5], -8, 7),
    "per channel along a negative axis": _case([[1.0, -2.0], [3.0, 0.4]], [0.5, 0.25], [1.0, 2.0], 0, 7, ch_axis=-1),
    "per channel on a 1-D input": _case([1.0, -2.0, 30.0], [0.5, 0.25, 1.0], [0.0, 1.0, 2.0], -4, 3, ch_axis=0),
    "empty input": _case([], [0.1], [2.0]),
    "float16": _case([0.1, -3.2, 1000.0, 0.55], [0.05], [10.0], dtype=torch.float16),
    "bfloat16": _case([0.1, -3.2, 1000.0, 0.55], [0.05], [10.0], dtype=torch.bfloat16),
    "float64": _case([0.1, -3.2, 1000.0, 0.55, 1e-300], [0.05], [10.0], dtype=torch.float64),
    "grad factor": _case([0.3, -1.0, 9.0, 300.0], [0.1], [5.0], grad_factor=0.013),
}


@pytest.mark.parametrize("name", EDGE_CASES)
def test_compiled_keeps_every_edge_policy(name: str) -> None:
    assert_matches_eager(EDGE_CASES[name])


def test_compiled_nan_makes_its_channel_gradients_nan_only() -> None:
    case = _case([[NAN, 1.0], [2.0, 3.0]], [0.5, 0.5], [1.0, 1.0], 0, 15, ch_axis=0)
    _, _, grad_scale, grad_zero_point = _run(_compiled_learnable, case, torch.ones(2, 2))
    assert torch.isnan(grad_scale[0]) and torch.isnan(grad_zero_point[0])
    assert torch.isfinite(grad_scale[1]) and torch.isfinite(grad_zero_point[1])


def test_compiled_fixed_qparam_fake_quantize_matches_eager() -> None:
    x = torch.tensor([[NAN, -0.01, 0.5, 1.5], [9.0, -9.0, INF, 2.5]])
    grad_y = torch.arange(8.0).reshape(2, 4)

    def run(fn):  # noqa: ANN001, ANN202
        leaf = x.clone().requires_grad_()
        y = fn(leaf, torch.tensor([0.5, 1.0]), torch.tensor([3, 1], dtype=torch.int32), 0, 15, ch_axis=0)
        (grad,) = torch.autograd.grad(y, leaf, grad_y)
        return y.detach(), grad

    eager = run(fake_quantize)
    compiled = run(torch.compile(fake_quantize, fullgraph=True))
    for a, b in zip(eager, compiled):
        assert torch.equal(_bits(a), _bits(b))


def _activation_quantizer() -> EQLearnableFakeQuantize:
    return EQLearnableFakeQuantize(
        observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
        dtype=torch.quint8, qscheme=torch.per_tensor_affine, use_grad_scaling=True,
    )


def _weight_quantizer(channels: int) -> EQLearnableFakeQuantize:
    return EQLearnableFakeQuantize(
        observer=tq.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0,
        use_grad_scaling=True, channel_len=channels,
    )


@pytest.mark.parametrize("kind", ["activation, per tensor", "weight, per channel", "fixed qparams"])
def test_modules_trace_without_a_graph_break(kind: str) -> None:
    x = torch.randn(4, 8, 5, 5) * 3
    if kind == "fixed qparams":
        fq = EQFakeQuantize(observer=tq.MinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8)
        fq(x)
        fq.disable_observer()
    else:
        fq = _activation_quantizer() if kind.startswith("activation") else _weight_quantizer(4)
        fq(x)  # the observer sets the qparams, then QAT learns them
        fq.enable_param_learning()
    explanation = torch._dynamo.explain(fq)(x.requires_grad_())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # The quantizer stays one autograd function in the graph, so its own backward runs (traced
    # ops would differentiate round() as 0).
    assert _autograd_functions(explanation.graphs[0]) == 1


def _autograd_functions(graph: torch.fx.GraphModule) -> int:
    return sum(type(node.target).__name__ == "AutogradFunctionApply" for node in graph.graph.nodes)


class _SmallNet(nn.Module):
    """Two fake-quantized convolutions and a fake-quantized linear head, as prepare makes them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8, 4)
        self.weight_quant = nn.ModuleList(_weight_quantizer(c) for c in (8, 8, 4))
        self.act_quant = nn.ModuleList(_activation_quantizer() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_quant[0](x)
        x = torch.relu(nn.functional.conv2d(x, self.weight_quant[0](self.conv1.weight), self.conv1.bias))
        x = torch.relu(nn.functional.conv2d(x, self.weight_quant[1](self.conv2.weight), self.conv2.bias))
        x = self.act_quant[1](x.mean((2, 3)))
        return self.act_quant[2](nn.functional.linear(x, self.weight_quant[2](self.head.weight), self.head.bias))


@pytest.mark.slow
def test_compiled_qat_step_matches_the_eager_step() -> None:
    net = _SmallNet()
    data = torch.randn(6, 3, 10, 10)
    net(data)  # calibrate every quantizer's observer
    for fq in [*net.weight_quant, *net.act_quant]:
        fq.enable_param_learning()
    nets = {"eager": net, "compiled": copy.deepcopy(net)}
    target = torch.arange(6) % 4
    losses = {}
    for name, model in nets.items():
        step = torch.compile(model) if name == "compiled" else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(2):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(step(data), target)
            loss.backward()
            optimizer.step()
        losses[name] = loss.item()
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
    eager_params = dict(nets["eager"].named_parameters())
    for name, param in nets["compiled"].named_parameters():
        torch.testing.assert_close(param, eager_params[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "affine"])
def test_compiled_module_output_is_bit_identical(symmetric: bool) -> None:
    """The module pins a symmetric zero point to 0 inside the traced graph, so the compiler knows
    z = 0 and could drop the addition that turns round's -0.0 into +0.0; NaNs keep their bits."""
    x = torch.tensor([NAN, -NAN, INF, -INF, -0.0, 0.0, -0.01, 0.01, -0.049, 1.25, -1.25, 0.75, 100.0, -100.0])
    fq = EQLearnableFakeQuantize(
        observer=tq.MinMaxObserver, quant_min=-128 if symmetric else 0, quant_max=127 if symmetric else 255,
        dtype=torch.qint8 if symmetric else torch.quint8,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine, use_grad_scaling=True,
    )
    fq.scale.data.fill_(0.1)
    fq.zero_point.data.fill_(0.0 if symmetric else 3.0)
    fq.enable_param_learning()
    eager = fq(x.clone().requires_grad_())
    compiled = torch.compile(fq, fullgraph=True)(x.clone().requires_grad_())
    assert torch.equal(_bits(eager.detach()), _bits(compiled.detach()))


def test_compiled_module_writes_no_parameter_but_uses_the_same_values() -> None:
    """Eagerly, forward clamps the scale to eps and zeroes a symmetric zero point in place; a
    compiled forward leaves the parameters as they are and quantizes with the same values."""
    x = torch.randn(4, 6) * 1e-6
    eager_fq = _weight_quantizer(4)
    eager_fq.scale.data = torch.tensor([1e-9, 2e-8, 1e-7, 1e-3])
    eager_fq.zero_point.data = torch.tensor([3.0, -1.0, 0.0, 2.0])  # a symmetric scheme ignores these
    eager_fq.enable_param_learning()
    compiled_fq = copy.deepcopy(eager_fq)
    before = compiled_fq.scale.detach().clone(), compiled_fq.zero_point.detach().clone()
    compiled = torch.compile(compiled_fq, fullgraph=True)(x)
    eager = eager_fq(x)
    assert torch.equal(_bits(compiled.detach()), _bits(eager.detach()))
    assert torch.equal(compiled_fq.scale.detach(), before[0]) and torch.equal(compiled_fq.zero_point.detach(), before[1])
    assert bool((eager_fq.scale >= torch.finfo(torch.float32).eps).all()) and not eager_fq.zero_point.any()


@pytest.mark.parametrize("backend", ["fx", "pt2e"])
def test_prepared_model_traces_without_a_graph_break_in_qat(backend: str) -> None:
    """What users compile: a model prepared by either backend, calibrated, then learning its qparams."""
    from eqcore.models.zoo import get_model
    from eqcore.prepare.calibrate import calibrate
    from eqcore.prepare.quantize import prepare
    from eqcore.quant.toggles import enable_param_learning

    zoo = get_model("digits")
    prepared = prepare(zoo.model, "w8a8", zoo.example_inputs(), backend=backend)
    data = torch.randn(16, 1, 8, 8)
    calibrate(prepared.model, [data])
    model = prepared.model.train()
    model.apply(enable_param_learning)
    assert len(prepared.quantizers) > 10
    explanation = torch._dynamo.explain(model)(data)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    assert _autograd_functions(explanation.graphs[0]) == len(prepared.quantizers)
