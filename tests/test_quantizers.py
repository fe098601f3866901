"""Fake-quantization numerics (DESIGN.md section 4): properties, torch's kernels, torch's bugs, bad input.

The oracle is ``eqcore.testing.check_fake_quantize`` (a float64 reference built from explicit
masks); the relational properties are also asserted one by one, each against values the test
computes itself from u = x * (1/s), the grid coordinate the module docstring defines.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from eqcore.quant.functional import (
    check_quant_range,
    fake_quantize,
    grad_scaling_factor,
    learnable_fake_quantize,
    normalize_axis,
)
from eqcore.quant.modules import EQFakeQuantize, EQLearnableFakeQuantize
from eqcore.testing import check_fake_quantize, reference_fake_quantize, run_fake_quantize
from eqcore._torch_ao import tq
from fq_kernels import PATHS, kernel_path
from strategies_fq import DTYPES, FQCase, fq_cases, grid_span, grid_units, quant_ranges, scales, zero_points

F32_EPS = torch.finfo(torch.float32).eps
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so +0.0 and -0.0 (and NaN payloads) compare as different."""
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    differ = bits(a) != bits(b)
    assert not bool(differ.any()), f"{what}: {int(differ.sum())} elements differ, e.g. {a[differ][:4].tolist()} vs {b[differ][:4].tolist()}"


def ours(x, scale, zero_point, quant_min, quant_max, ch_axis, grad_factor):  # noqa: ANN001, ANN201
    return learnable_fake_quantize(x, scale, zero_point, quant_min, quant_max, ch_axis=ch_axis, grad_factor=grad_factor)


def with_axis(ch_axis: int | None):  # noqa: ANN201
    """Our function with the case's own (possibly negative) axis; the checker passes it normalised."""

    def fn(x, scale, zero_point, quant_min, quant_max, axis, grad_factor):  # noqa: ANN001, ANN202
        assert axis == (None if ch_axis is None else ch_axis % x.dim())
        return learnable_fake_quantize(x, scale, zero_point, quant_min, quant_max, ch_axis=ch_axis, grad_factor=grad_factor)

    return fn


def run(case: FQCase, grad_y: torch.Tensor | None = None, grad_factor: float = 1.0):  # noqa: ANN201
    """One forward+backward of learnable_fake_quantize on the case (dY = 1 unless given)."""
    return run_fake_quantize(
        with_axis(case.ch_axis), case.x, case.scale, case.zero_point, case.quant_min, case.quant_max,
        ch_axis=case.axis, grad_factor=grad_factor, grad_y=grad_y,
    )


def grid_position(case: FQCase) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, u) in float64: u = x * (1/s) in the compute dtype (float64 for float64 input, else float32)."""
    if case.x.dtype == torch.float64:
        u = case.x * torch.reciprocal(case.s64())
    else:
        u = (case.x.float() * torch.reciprocal(case.scale.float().reshape(case.channel_shape()))).double()
    return torch.round(u) + case.z64(), u


def sum_per_channel(t: torch.Tensor, case: FQCase) -> torch.Tensor:
    if case.axis is None:
        return t.sum().reshape(1)
    dims = [d for d in range(t.dim()) if d != case.axis]
    return t.sum(dims) if dims else t


def summation_tol(terms: torch.Tensor, case: FQCase) -> torch.Tensor:
    """Float32 recursive-summation bound for per-channel sums of ``terms``: (n + 2) eps sum|t|."""
    n = case.x.numel() if case.axis is None else case.x.numel() // case.x.shape[case.axis]
    return sum_per_channel(terms.abs(), case) * (n + 2) * F32_EPS + 1e-30


def grad_y_for(x: torch.Tensor) -> torch.Tensor:
    """A dY with distinct, sign-changing entries (exact in every dtype)."""
    n = x.numel()
    return (torch.arange(n, dtype=torch.float64).remainder(7).sub(3).div(4)).reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# The reference checker as the oracle.


def checker_agrees_on_grid_coordinate(case: FQCase) -> bool:
    """False for float64 values within an ulp of a tie, where the checker divides and we multiply
    by 1/s (the known checker bug, test_checker_uses_the_documented_grid_coordinate_for_float64)."""
    if case.x.dtype != torch.float64:
        return True
    s = case.s64()
    return torch.equal(torch.round(case.x / s), torch.round(case.x * torch.reciprocal(s)))


@pytest.mark.parametrize("path", PATHS)
@given(case=fq_cases(), grad_factor=st.sampled_from([1.0, 0.5, 0.013, None]))
def test_learnable_matches_reference_checker(path: str, case: FQCase, grad_factor: float | None) -> None:
    with kernel_path(path):
        learnable_matches_reference_checker(case, grad_factor)


def learnable_matches_reference_checker(case: FQCase, grad_factor: float | None) -> None:
    if grad_factor is None:
        grad_factor = grad_scaling_factor(case.x.numel(), case.quant_max)
    # A float64 model has float64 qparams; the checker's float64 tolerances assume it (see below).
    params = torch.float64 if case.x.dtype == torch.float64 else torch.float32
    assume(checker_agrees_on_grid_coordinate(case))
    check_fake_quantize(
        with_axis(case.ch_axis), case.x, case.scale.to(params), case.zero_point.to(params),
        case.quant_min, case.quant_max, ch_axis=case.ch_axis, grad_factor=grad_factor,
    )


def test_checker_uses_the_documented_grid_coordinate_for_float64() -> None:
    """u = x * (1/s), the module docstring's definition, also in float64.

    x = 2.5 * 56.75 exactly: x * (1/s) = 2.5000000000000004 rounds to 3, x / s = 2.5 to 2. Ours
    follows its documented policy (as in float32, where it must match torch bit for bit);
    ``eqcore.testing.grid_coordinate`` documents x * (1/s) too but divides for float64 input.
    """
    x = torch.tensor([141.875], dtype=torch.float64)
    scale, zero_point = torch.tensor([56.75], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    y = learnable_fake_quantize(x, scale, zero_point, -4, 3)
    assert float(y) == round(141.875 * (1 / 56.75)) * 56.75 == 3 * 56.75
    check_fake_quantize(ours, x, scale, zero_point, -4, 3)


def test_checker_accepts_float64_input_with_float32_qparams() -> None:
    """Float64 input, float32 params (the module's default): dS and dZ come back in float32.

    Exposes a checker bug: check_fake_quantize compares grad_factor scaling with rtol 1e-12 for
    float64 *input*, but the gradients it compares have the params' dtype (float32).
    """
    x = torch.tensor([0.0, 0.0, -1.0, 0.0], dtype=torch.float64)
    scale, zero_point = torch.tensor([1.0]), torch.tensor([0.0])
    mine = run_fake_quantize(ours, x, scale, zero_point, 0, 3, grad_factor=1 / 3, grad_y=torch.ones_like(x))
    assert mine.grad_zero_point.dtype == torch.float32
    assert float(mine.grad_zero_point) == pytest.approx(-1 / 3, rel=1e-7)
    check_fake_quantize(ours, x, scale, zero_point, 0, 3, grad_factor=0.013)


@pytest.mark.parametrize("path", ["host", "device"])
@settings(max_examples=75)
@given(case=fq_cases(per_channel=False, integer_zero_point=True) | fq_cases(per_channel=True, integer_zero_point=True))
def test_fake_quantize_forward_and_mask_match_reference(path: str, case: FQCase) -> None:
    """The non-learnable function: forward equals the learnable one bit for bit, dX is the mask."""
    with kernel_path(path):
        fake_quantize_forward_and_mask_match_reference(case)


def fake_quantize_forward_and_mask_match_reference(case: FQCase) -> None:
    x = case.x.clone().requires_grad_(True)
    y = fake_quantize(x, case.scale, case.zero_point, case.quant_min, case.quant_max, ch_axis=case.ch_axis)
    dy = grad_y_for(case.x)
    (dx,) = torch.autograd.grad(y, x, dy)
    expected = run(case, grad_y=dy)
    assert_bits_equal(y.detach(), expected.y, "forward vs learnable_fake_quantize")
    q, _ = grid_position(case)
    inside = (q >= case.quant_min) & (q <= case.quant_max)
    assert_bits_equal(dx, torch.where(inside, dy, torch.zeros_like(dy)), "dX")
    ref = reference_fake_quantize(case.x, case.scale, case.zero_point, case.quant_min, case.quant_max, ch_axis=case.ch_axis)
    if case.x.dtype in (torch.float32, torch.float64):
        assert_bits_equal(y.detach(), ref.y.to(case.x.dtype), "forward vs reference")


@settings(max_examples=75)
@given(qrange=quant_ranges(16), s=scales(), u=st.floats(-70000, 70000), data=st.data())
def test_fake_quantize_accepts_python_number_qparams(qrange, s, u, data) -> None:  # noqa: ANN001
    qmin, qmax = qrange
    z = data.draw(st.integers(qmin, qmax))
    x = torch.tensor([u * s, 0.0, -u * s], dtype=torch.float32)
    got = fake_quantize(x, s, z, qmin, qmax)
    want = fake_quantize(x, torch.tensor([s]), torch.tensor([float(z)]), qmin, qmax)
    assert_bits_equal(got, want)


def _module_fn(case: FQCase):  # noqa: ANN202
    """EQLearnableFakeQuantize in learning mode as a checker function (params swapped in)."""
    per_channel = case.ch_axis is not None
    # Affine even when z = 0: symmetric modules pin dZ to 0 (tested in test_quantizer_modules.py).
    qscheme = torch.per_channel_affine if per_channel else torch.per_tensor_affine
    observer = tq.PerChannelMinMaxObserver.with_args(ch_axis=case.ch_axis) if per_channel else tq.MinMaxObserver
    modules = {}
    for scaling in (False, True):
        m = EQLearnableFakeQuantize(
            observer=observer, quant_min=case.quant_min, quant_max=case.quant_max,
            channel_len=case.scale.numel() if per_channel else -1, use_grad_scaling=scaling,
            dtype=torch.qint32, qscheme=qscheme,
        )
        modules[scaling] = m.enable_param_learning()
    expected_factor = grad_scaling_factor(case.x.numel(), case.quant_max)

    def fn(x, scale, zero_point, quant_min, quant_max, axis, grad_factor):  # noqa: ANN001, ANN202
        assert grad_factor in (1.0, expected_factor)
        module = modules[grad_factor != 1.0]
        return torch.func.functional_call(module, {"scale": scale, "zero_point": zero_point}, (x,))

    return fn, expected_factor


@settings(max_examples=60)
@given(case=fq_cases(dtypes=(torch.float32, torch.float64), integer_zero_point=True))
def test_module_learning_mode_matches_reference_checker(case: FQCase) -> None:
    """The module applies exactly 1/sqrt(numel * qmax) with use_grad_scaling, and the same numerics."""
    fn, factor = _module_fn(case)
    assume(factor != 1.0 and checker_agrees_on_grid_coordinate(case))
    params = torch.float64 if case.x.dtype == torch.float64 else torch.float32
    check_fake_quantize(
        fn, case.x, case.scale.to(params), case.zero_point.to(params), case.quant_min, case.quant_max,
        ch_axis=case.ch_axis, grad_factor=factor,
    )


def test_grad_scaling_factor_is_lsq() -> None:
    assert grad_scaling_factor(100, 255) == 1.0 / math.sqrt(100 * 255)
    assert grad_scaling_factor(1, 1) == 1.0
    assert grad_scaling_factor(0, 255) == 1.0 / math.sqrt(255)  # empty input: no division by zero


# ---------------------------------------------------------------------------------------------
# The section 4 properties, one by one.


@settings(max_examples=75)
@given(case=fq_cases())
def test_output_on_grid(case: FQCase) -> None:
    """y = (k - z) * s (rounded once to the dtype) for an integer k in [qmin, qmax]."""
    y = run(case).y
    s, z = case.s64().expand_as(y), case.z64().expand_as(y)
    k = torch.round(y.double() / s + z)
    assert bool(((k >= case.quant_min) & (k <= case.quant_max)).all())
    compute = torch.float64 if y.dtype == torch.float64 else torch.float32
    rebuilt = ((k - z).to(compute) * s.to(compute)).to(y.dtype)
    assert_bits_equal(y, rebuilt, "y is not a grid point")


@settings(max_examples=75)
@given(case=fq_cases())
def test_idempotent(case: FQCase) -> None:
    y = run(case).y
    again = run(FQCase(y, case.scale, case.zero_point, case.quant_min, case.quant_max, case.ch_axis)).y
    assert_bits_equal(again, y, "fake_quantize(fake_quantize(x)) != fake_quantize(x)")


@settings(max_examples=75)
@given(case=fq_cases(per_channel=False, min_size=2))
def test_monotonic(case: FQCase) -> None:
    x = torch.sort(case.x).values
    y = run(FQCase(x, case.scale, case.zero_point, case.quant_min, case.quant_max, None)).y
    assert bool((y[1:] >= y[:-1]).all()), (x.tolist(), y.tolist())


@settings(max_examples=75)
@given(case=fq_cases())
def test_error_at_most_half_step_inside(case: FQCase) -> None:
    y = run(case).y.double()
    q, u = grid_position(case)
    inside = (q >= case.quant_min) & (q <= case.quant_max)
    s = case.s64().expand_as(y)
    x = case.x.double()
    # s/2, plus the rounding of u = x * (1/s) in float32 and of y to the dtype.
    eps_x = torch.finfo(case.x.dtype).eps
    slack = 4 * F32_EPS * s * (u.abs() + 1) + eps_x * y.abs() if case.x.dtype != torch.float64 else 4 * 2.0**-52 * s * (u.abs() + 1)
    err = (y - x).abs()
    assert bool((err[inside] <= (s / 2 + slack)[inside]).all())
    # And the clamped values sit on the range ends.
    z = case.z64().expand_as(y)
    below, above = q < case.quant_min, q > case.quant_max
    k = torch.round(y / s + z)
    assert bool((k[below] == case.quant_min).all()) and bool((k[above] == case.quant_max).all())


@settings(max_examples=75)
@given(case=fq_cases())
def test_dx_is_the_mask(case: FQCase) -> None:
    dy = grad_y_for(case.x)
    got = run(case, grad_y=dy)
    q, _ = grid_position(case)
    inside = (q >= case.quant_min) & (q <= case.quant_max)
    assert_bits_equal(got.grad_x, torch.where(inside, dy, torch.zeros_like(dy)), "dX")


@settings(max_examples=75)
@given(case=fq_cases(), grad_factor=st.sampled_from([1.0, 0.25, 0.07]))
def test_dz_is_minus_s_times_outside_dy(case: FQCase, grad_factor: float) -> None:
    dy = grad_y_for(case.x)
    got = run(case, grad_y=dy, grad_factor=grad_factor)
    q, _ = grid_position(case)
    outside = (q < case.quant_min) | (q > case.quant_max)
    terms = torch.where(outside, dy.double(), torch.zeros_like(q))
    s = case.scale.double()
    expected = -s * sum_per_channel(terms, case) * grad_factor
    tol = summation_tol(terms, case) * s * grad_factor
    assert bool(((got.grad_zero_point.double() - expected).abs() <= tol).all()), (got.grad_zero_point, expected)


@settings(max_examples=75)
@given(
    qrange=quant_ranges(16),
    s=scales(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    dy=st.sampled_from([1.0, -1.0, 0.5, 3.0]),
    data=st.data(),
)
@example(qrange=(0, 255), s=1.0, dtype=torch.float32, dy=1.0, data=None)
def test_ds_per_element(qrange, s, dtype, dy, data) -> None:  # noqa: ANN001
    """One element: dS = dY*(round(u) - u), in [-1/2, 1/2]*|dY|, inside; dY*(qmin - z) / dY*(qmax - z) outside."""
    qmin, qmax = qrange
    if data is None:  # pinned: an exact tie just inside the top of the range
        z, u = 1.0, 254.5
    else:
        z = data.draw(zero_points(qmin, qmax, integer=True))
        u = data.draw(grid_units(*grid_span(qmin, qmax, z)))
    case = FQCase(torch.tensor([u * s], dtype=dtype), torch.tensor([s]), torch.tensor([z]), qmin, qmax, None)
    got = run(case, grad_y=torch.tensor([dy], dtype=dtype))
    q, u_exact = grid_position(case)
    ds = float(got.grad_scale)
    if qmin <= float(q) <= qmax:
        assert abs(ds) <= 0.5 * abs(dy)
        # Exact up to the one rounding to the float32 parameter's dtype.
        assert ds == float(torch.tensor(dy * float(torch.round(u_exact) - u_exact), dtype=torch.float64).float())
        # dS inside is y/s - x/s (up to the rounding of u and of the float32 result): consistent
        # with the forward output.
        assert ds == pytest.approx(dy * float((got.y.double() - case.x.double()) / s), abs=4 * F32_EPS * (abs(u) + 1) * abs(dy))
    elif float(q) < qmin:
        assert ds == dy * (qmin - z)
    else:
        assert ds == dy * (qmax - z)


@settings(max_examples=50)
@given(case=fq_cases(), exponent=st.integers(-12, 6), factor=st.floats(1e-4, 10.0))
def test_grad_factor_scales_ds_dz_exactly_and_leaves_dx(case: FQCase, exponent: int, factor: float) -> None:
    dy = grad_y_for(case.x)
    one = run(case, grad_y=dy)
    g = 2.0**exponent
    pow2 = run(case, grad_y=dy, grad_factor=g)
    assert_bits_equal(pow2.grad_x, one.grad_x, "dX must not depend on grad_factor")
    assert_bits_equal(pow2.grad_scale, one.grad_scale * g, "dS with a power-of-two grad_factor")
    assert_bits_equal(pow2.grad_zero_point, one.grad_zero_point * g, "dZ with a power-of-two grad_factor")
    any_g = run(case, grad_y=dy, grad_factor=factor)
    assert_bits_equal(any_g.grad_x, one.grad_x)
    for got, unit in ((any_g.grad_scale, one.grad_scale), (any_g.grad_zero_point, one.grad_zero_point)):
        want = unit.double() * factor
        assert bool(((got.double() - want).abs() <= 2 * F32_EPS * want.abs() + 1e-38).all()), (got, want)


@settings(max_examples=50)
@given(case=fq_cases(), data=st.data())
def test_linear_in_dy(case: FQCase, data) -> None:  # noqa: ANN001
    dy1 = grad_y_for(case.x)
    dy2 = torch.tensor(
        data.draw(st.lists(st.sampled_from([-2.0, -0.75, 0.0, 0.5, 1.0]), min_size=case.x.numel(), max_size=case.x.numel())),
        dtype=case.x.dtype,
    ).reshape(case.x.shape)
    a, b, both = run(case, grad_y=dy1), run(case, grad_y=dy2), run(case, grad_y=dy1 + dy2)
    q, _ = grid_position(case)
    inside = (q >= case.quant_min) & (q <= case.quant_max)
    assert_bits_equal(both.grad_x, torch.where(inside, dy1 + dy2, torch.zeros_like(dy1)))
    bound = case.x.double().abs() / case.s64() + abs(case.quant_min) + abs(case.quant_max) + 1
    tol_s = summation_tol((dy1.double().abs() + dy2.double().abs()) * bound, case) * 4
    tol_z = summation_tol(dy1.double().abs() + dy2.double().abs(), case) * case.scale.double() * 4
    assert bool(((both.grad_scale.double() - a.grad_scale.double() - b.grad_scale.double()).abs() <= tol_s).all())
    assert bool(((both.grad_zero_point.double() - a.grad_zero_point.double() - b.grad_zero_point.double()).abs() <= tol_z).all())
    # Scaling dY by a power of two scales every gradient exactly.
    four = run(case, grad_y=dy1 * 4)
    for name, got, base in (("dX", four.grad_x, a.grad_x), ("dS", four.grad_scale, a.grad_scale), ("dZ", four.grad_zero_point, a.grad_zero_point)):
        assert_bits_equal(got, base * 4, name)


@settings(max_examples=50)
@given(case=fq_cases(per_channel=True))
def test_per_channel_with_equal_scales_equals_per_tensor(case: FQCase) -> None:
    c = case.scale.numel()
    equal = FQCase(case.x, case.scale[:1].repeat(c), case.zero_point[:1].repeat(c), case.quant_min, case.quant_max, case.ch_axis)
    per_tensor = FQCase(case.x, case.scale[:1], case.zero_point[:1], case.quant_min, case.quant_max, None)
    dy = grad_y_for(case.x)
    pc, pt = run(equal, grad_y=dy), run(per_tensor, grad_y=dy)
    assert_bits_equal(pc.y, pt.y, "y")
    assert_bits_equal(pc.grad_x, pt.grad_x, "dX")
    bound = case.x.double().abs() / case.scale[0].double() + abs(case.quant_min) + abs(case.quant_max) + 1
    n = case.x.numel()
    tol_s = float((dy.double().abs() * bound).sum()) * (n + 2) * F32_EPS + 1e-30
    tol_z = float(dy.double().abs().sum()) * (n + 2) * F32_EPS * float(case.scale[0]) + 1e-30
    assert abs(float(pc.grad_scale.double().sum()) - float(pt.grad_scale)) <= tol_s
    assert abs(float(pc.grad_zero_point.double().sum()) - float(pt.grad_zero_point)) <= tol_z


@settings(max_examples=50)
@given(case=fq_cases(per_channel=True))
def test_per_channel_slice_equals_per_tensor(case: FQCase) -> None:
    dy = grad_y_for(case.x)
    pc = run(case, grad_y=dy)
    axis = case.axis
    for c in range(case.scale.numel()):
        xs = case.x.select(axis, c).reshape(-1)
        one = FQCase(xs, case.scale[c : c + 1], case.zero_point[c : c + 1], case.quant_min, case.quant_max, None)
        dys = dy.select(axis, c).reshape(-1)
        pt = run(one, grad_y=dys)
        assert_bits_equal(pc.y.select(axis, c).reshape(-1), pt.y, f"y of channel {c}")
        assert_bits_equal(pc.grad_x.select(axis, c).reshape(-1), pt.grad_x, f"dX of channel {c}")
        bound = xs.double().abs() / case.scale[c].double() + abs(case.quant_min) + abs(case.quant_max) + 1
        n = xs.numel()
        tol_s = float((dys.double().abs() * bound).sum()) * (n + 2) * F32_EPS + 1e-30
        tol_z = float(dys.double().abs().sum()) * (n + 2) * F32_EPS * float(case.scale[c]) + 1e-30
        assert abs(float(pc.grad_scale[c]) - float(pt.grad_scale)) <= tol_s
        assert abs(float(pc.grad_zero_point[c]) - float(pt.grad_zero_point)) <= tol_z


@settings(max_examples=75)
@given(case=fq_cases(dtypes=(torch.float32, torch.float64)), k=st.integers(-6, 6))
def test_power_of_two_scale_homogeneity(case: FQCase, k: int) -> None:
    """x*2^k with s*2^k gives y*2^k exactly; dX and dS are unchanged, dZ scales by 2^k."""
    x = torch.where(case.x.abs() < 2.0**-90, torch.zeros_like(case.x), case.x)  # no subnormals after scaling
    base = FQCase(x, case.scale, case.zero_point, case.quant_min, case.quant_max, case.ch_axis)
    scaled = FQCase(x * 2.0**k, case.scale * 2.0**k, case.zero_point, case.quant_min, case.quant_max, case.ch_axis)
    dy = grad_y_for(x)
    a, b = run(base, grad_y=dy), run(scaled, grad_y=dy)
    assert_bits_equal(b.y, a.y * 2.0**k, "y")
    assert_bits_equal(b.grad_x, a.grad_x, "dX")
    assert_bits_equal(b.grad_scale, a.grad_scale, "dS")
    assert_bits_equal(b.grad_zero_point, a.grad_zero_point * 2.0**k, "dZ")


def chunk_contents(per_channel: bool, dtype: torch.dtype) -> torch.Tensor:
    """A (4, 6, 16) input on the grid [-4, 3] (s = 1, z = 0) whose 64-element chunks (per tensor)
    hold in turn: a value below the grid, values above it (one a tie at qmax + 1/2), both, a NaN,
    +-inf, and only grid values (one a tie at qmin - 1/2 that rounds inside)."""
    torch.manual_seed(7)
    x = (torch.rand(4, 6, 16, dtype=torch.float64) * 6 - 3).to(dtype)
    x[0, 1, 3] = -9.0
    x[0, 4, 5], x[1, 1, 7] = 7.0, 3.5
    x[1, 2, 0], x[1, 5, 9] = -6.0, 11.0
    x[2, 0, 2] = math.nan
    x[2, 4, 4], x[3, 1, 5] = math.inf, -math.inf
    x[3, 3, 8] = -4.5
    if per_channel:
        x[:, 2] = x[:, 2] * 0.25  # a channel with every value inside
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("ch_axis", "zero_point"), [(None, [0.0]), (1, [0.0] * 6), (1, [0.0, 1, -1, 2, 0, 0]), (0, [0.0, 0, 0, 1])])
@pytest.mark.parametrize("learnable", [True, False])
def test_host_and_device_kernels_agree_bit_for_bit_across_chunks(dtype, ch_axis, zero_point, learnable) -> None:  # noqa: ANN001
    """The CPU kernels steer each chunk by its grid range (all inside: dX = dY; masks only for the
    sides that have values; NaN or inf: the exact path). Every branch, chunk by chunk in one
    tensor, gives the bits of the device kernels, which read nothing back."""
    x = chunk_contents(ch_axis is not None, dtype)
    scale = torch.ones(len(zero_point), dtype=torch.float32) * (0.5 if ch_axis == 0 else 1.0)
    zp = torch.tensor(zero_point)
    dy = grad_y_for(x)
    results = []
    for path in ("host", "device"):
        with kernel_path(path, chunk=64):
            xg, sg, zg = x.clone().requires_grad_(True), scale.clone().requires_grad_(learnable), zp.clone().requires_grad_(learnable)
            if learnable:
                y = learnable_fake_quantize(xg, sg, zg, -4, 3, ch_axis=ch_axis, grad_factor=0.5)
                grads = torch.autograd.grad(y, (xg, sg, zg), dy)
            else:
                y = fake_quantize(xg, sg, zg, -4, 3, ch_axis=ch_axis)
                grads = torch.autograd.grad(y, (xg,), dy)
            results.append((y.detach(), *grads))
    host, device = results
    for name, a, b in zip(("y", "dX", "dS", "dZ"), host, device):
        assert_bits_equal(a, b, name)
    dx = host[1]
    assert bool(torch.isnan(host[0]).any()) and bool((dx[x.isnan() | x.isinf()] == 0).all())
    if learnable:  # the NaN reaches dS and dZ of its own channel only
        assert bool(host[2].isnan().any()) and bool(host[3].isnan().any())
        if ch_axis is not None:
            assert not bool(host[2].isnan().all())


# ---------------------------------------------------------------------------------------------
# A tensor quantized per channel (a weight) keeps each element's factor of dS from the forward.


def weight_step(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, ch_axis: int | None,
    dy: torch.Tensor, *, learn_zero_point: bool = False,
) -> tuple[bool, torch.Tensor, tuple[torch.Tensor, ...]]:
    """One step on a weight: (kept the factor?, y, (dX, dS[, dZ]))."""
    xg = x.clone().requires_grad_(True)
    sg, zg = scale.clone().requires_grad_(True), zero_point.clone().requires_grad_(learn_zero_point)
    y = learnable_fake_quantize(xg, sg, zg, qmin, qmax, ch_axis=ch_axis, grad_factor=0.25)
    kept = y.grad_fn.factor is not None
    grads = torch.autograd.grad(y, (xg, sg, zg) if learn_zero_point else (xg, sg), dy)
    return kept, y.detach(), grads


def assert_factor_path_agrees(case: FQCase, dy: torch.Tensor, *, learn_zero_point: bool, chunk: int | None) -> None:
    """y and dX bit for bit as the backward that recomputes from x; dS and dZ within float32
    summation error of the float64 sums (the factor sums dY * f in one pass, the recomputing
    backward sums inside and outside apart)."""
    args = (case.x, case.scale, case.zero_point, case.quant_min, case.quant_max, case.ch_axis, dy)
    with kernel_path("host", chunk=chunk):
        kept, y, grads = weight_step(*args, learn_zero_point=learn_zero_point)
    with kernel_path("recompute", chunk=chunk):
        recomputed, y_r, grads_r = weight_step(*args, learn_zero_point=learn_zero_point)
    assert kept and not recomputed
    assert_bits_equal(y, y_r, "y")
    assert_bits_equal(grads[0], grads_r[0], "dX")
    z = case.z64()
    bound = torch.maximum((case.quant_min - z).abs(), (case.quant_max - z).abs()).clamp_min(0.5)
    dy64 = dy.double().abs()
    tol_s = summation_tol(dy64 * bound, case) * 0.25 * 2
    assert bool(((grads[1].double() - grads_r[1].double()).abs() <= tol_s).all()), (grads[1], grads_r[1])
    if learn_zero_point:
        tol_z = summation_tol(dy64, case) * case.scale.double() * 0.25 * 2
        assert bool(((grads[2].double() - grads_r[2].double()).abs() <= tol_z).all()), (grads[2], grads_r[2])


@settings(max_examples=60)
@given(
    case=fq_cases(per_channel=True, symmetric=True),
    learn_zero_point=st.booleans(),
    chunk=st.sampled_from([None, 8]),
)
def test_weight_keeps_its_factor_of_ds_and_gets_the_recomputed_gradients(case: FQCase, learn_zero_point: bool, chunk: int | None) -> None:
    """Symmetric weights of every range down to 2 bits ([-1, 1]: the outside factors are +-1, the
    smallest that still tell dX apart), any axis, every dtype; ``chunk`` 8 splits channels across
    chunks."""
    assert_factor_path_agrees(case, grad_y_for(case.x), learn_zero_point=learn_zero_point, chunk=chunk)


def factor_case_x(dtype: torch.dtype) -> torch.Tensor:
    """A (3, 2, 5) weight for the grid [0, 15] with z = 3 (u from -3 to 12 inside): ties on both
    edges and inside, values just beyond the edges, far beyond them, and +-inf."""
    u = torch.tensor(
        [
            [[-3.5, -2.5, 12.5, 11.5, 0.5], [1.5, -0.5, -3.0, 12.0, 7.25]],
            [[-3.51, 12.49, -40.0, 300.0, 2.5], [math.inf, -math.inf, 0.0, -0.0, 5.75]],
            [[12.51, -3.49, 6.5, -1.5, 9.0], [4.0, 3.3, -2.2, 11.1, 0.01]],
        ],
        dtype=torch.float64,
    )
    return (u * 0.5).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ch_axis", [0, 1, -1])
@pytest.mark.parametrize("learn_zero_point", [True, False])
def test_weight_factor_path_with_affine_zero_point_ties_and_inf(dtype, ch_axis, learn_zero_point) -> None:  # noqa: ANN001
    """+-inf stay on the factor path (they land outside the grid like any clamped value)."""
    x = factor_case_x(dtype)
    channels = x.shape[ch_axis]
    case = FQCase(x, torch.full((channels,), 0.5), torch.full((channels,), 3.0), 0, 15, ch_axis)
    for chunk in (None, 4):
        assert_factor_path_agrees(case, grad_y_for(x), learn_zero_point=learn_zero_point, chunk=chunk)


@pytest.mark.parametrize("where", ["x", "dy"])
def test_weight_factor_path_recomputes_from_x_when_a_nan_appears(where: str) -> None:
    """A NaN in x or dY makes the factor's sums NaN: the backward then recomputes from x, so every
    gradient is the recomputing path's, bit for bit (NaN dS and dZ in its channel only, dX = 0
    for a NaN input)."""
    x, dy = factor_case_x(torch.float32), grad_y_for(factor_case_x(torch.float32))
    (x if where == "x" else dy)[1, 0, 2] = math.nan
    args = (x, torch.full((3,), 0.5), torch.full((3,), 3.0), 0, 15, 0, dy)
    with kernel_path("host", chunk=4):
        kept, y, grads = weight_step(*args, learn_zero_point=True)
    with kernel_path("recompute", chunk=4):
        _, y_r, grads_r = weight_step(*args, learn_zero_point=True)
    assert kept
    for name, a, b in zip(("y", "dX", "dS", "dZ"), (y, *grads), (y_r, *grads_r)):
        assert_bits_equal(a, b, name)
    assert bool(grads[1][1].isnan()) and not bool(grads[1][[0, 2]].isnan().any())
    assert bool(grads[2][1].isnan()) and not bool(grads[2][[0, 2]].isnan().any())


def test_weight_factor_path_second_backward_through_a_retained_graph() -> None:
    """The first backward writes dX over the factor; a second one (retain_graph) recomputes from x
    and gives the same gradients, leaving the first dX untouched."""
    torch.manual_seed(2)
    x = (torch.randn(6, 4, 3) * 0.2).clamp(-1.2, 1.2)  # inside the grid, |u| <= 120
    x[:, 0, 0] = 2.0  # u = 200: above each channel's grid
    scale = torch.full((6,), 0.01)
    xg, sg = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    y = learnable_fake_quantize(xg, sg, torch.zeros(6), -128, 127, ch_axis=0)
    assert y.grad_fn.factor is not None
    dy = grad_y_for(x)
    dx1, ds1 = torch.autograd.grad(y, (xg, sg), dy, retain_graph=True)
    kept = dx1.clone()
    dx2, ds2 = torch.autograd.grad(y, (xg, sg), dy)
    assert_bits_equal(dx2, dx1, "dX of the second backward")
    assert_bits_equal(dx1, kept, "the first dX after the second backward")
    assert torch.allclose(ds2, ds1, rtol=1e-5, atol=0.0)
    assert bool((dx1[:, 0, 0] == 0).all()) and bool((dx1[:, 1:] == dy[:, 1:]).all())


def test_weight_gradients_accumulate_across_steps() -> None:
    """dX lives on the factor's recycled storage: a step that accumulates into x.grad must not get
    that storage back for its own factor or output while x.grad holds it."""
    torch.manual_seed(5)
    w = torch.nn.Parameter(torch.randn(8, 16) * 0.1)
    scale = torch.nn.Parameter(w.detach().abs().amax(1) / 127.5)
    dy = torch.randn(8, 16)
    grads = []
    for _ in range(3):
        learnable_fake_quantize(w, scale, torch.zeros(8), -128, 127, ch_axis=0).backward(dy)
        grads.append((w.grad.clone(), scale.grad.clone()))
    assert_bits_equal(grads[1][0], grads[0][0] * 2, "dX after two steps")
    assert_bits_equal(grads[2][0], grads[0][0] * 3, "dX after three steps")
    assert torch.allclose(grads[2][1], grads[0][1] * 3, rtol=1e-6)


def test_which_quantizations_keep_the_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per channel on the CPU, with a uniform zero point strictly inside the range and a learnable
    scale, whatever x is (a parameter, a weight scaled by a folded batch norm, a frozen weight).
    A per-tensor quantization, a zero point at qmin or qmax (its outside factor 0 could not be
    told from the inside ones), per-channel zero points that differ, a frozen scale, another
    device, and anything under no_grad recompute from x instead."""
    w = torch.randn(4, 6)
    scale, zeros = torch.full((4,), 0.02), torch.zeros(4)

    def keeps(x, s=scale, z=zeros, qrange=(-128, 127), ch_axis=0):  # noqa: ANN001, ANN202
        y = learnable_fake_quantize(x, s, z, *qrange, ch_axis=ch_axis)
        return y.grad_fn.factor is not None

    leaf, learnable = w.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    assert keeps(leaf, learnable)
    assert keeps(leaf * torch.rand(4, 1), learnable)  # folded batch norm
    assert keeps(w.clone(), learnable)  # a frozen weight
    assert keeps(leaf, learnable, torch.full((4,), 7.0), (0, 255))
    assert not keeps(leaf, learnable[:1], zeros[:1], ch_axis=None)
    assert not keeps(leaf, learnable, zeros, (0, 255))  # z = qmin
    assert not keeps(leaf, learnable, torch.full((4,), 255.0), (0, 255))  # z = qmax
    assert not keeps(leaf, learnable, torch.tensor([0.0, 1, 0, 0]))  # not uniform
    assert not keeps(leaf, scale)  # a frozen scale
    with kernel_path("device"):
        assert not keeps(leaf, learnable)

    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the factor was computed under no_grad")

    monkeypatch.setattr("eqcore.quant.functional._fake_quantize_keeping_factor", fail)
    with torch.no_grad():
        y = learnable_fake_quantize(leaf, learnable, zeros, -128, 127, ch_axis=0)
    assert_bits_equal(y, learnable_fake_quantize(leaf.detach(), scale, zeros, -128, 127, ch_axis=0), "y under no_grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zero_point", [0.0, 3.0])
def test_one_channel_sums_on_the_host_give_the_device_bits(dtype: torch.dtype, zero_point: float) -> None:
    """Per tensor on the CPU, dS and dZ are assembled from the three sums on Python floats: the
    same float64 operations as the tensors of the device path, so the same bits."""
    torch.manual_seed(11)
    x = (torch.randn(3, 40, dtype=torch.float64) * 6).to(dtype)  # values below and above [-8, 7] - z
    dy = grad_y_for(x)
    results = []
    for path in ("host", "device"):
        with kernel_path(path, chunk=16):  # several chunks: float64 sums of float32 parts
            xg = x.clone().requires_grad_(True)
            sg = torch.tensor([0.75], dtype=dtype).requires_grad_(True)  # float64 gradients for float64
            zg = torch.tensor([zero_point], dtype=dtype).requires_grad_(True)
            y = learnable_fake_quantize(xg, sg, zg, -8, 7, grad_factor=0.37)
            results.append(torch.autograd.grad(y, (xg, sg, zg), dy))
    for name, a, b in zip(("dX", "dS", "dZ"), *results):
        assert_bits_equal(a, b, name)
    assert float(results[0][2]) != 0.0  # values outside the grid reached dZ


@pytest.mark.parametrize(("ch_axis", "zero_point"), [(None, [2.0]), (1, [2.0] * 6), (1, [0.0, 1, -1, 2, 0, 0])])
@pytest.mark.parametrize("learnable", [True, False])
def test_dx_is_dy_itself_where_nothing_leaves_the_grid(ch_axis, zero_point, learnable) -> None:  # noqa: ANN001
    """No value outside the grid: dX is dY, returned without a copy (as autograd passes a gradient
    through an identity). Where a later chunk has a value outside, the earlier chunks' dX are
    written then, and a NaN's chunk (the exact path) does the same."""
    scale, zp = torch.ones(len(zero_point)), torch.tensor(zero_point)
    base = torch.rand(4, 6, 16, dtype=torch.float64).mul(4).sub(3).float()  # u in [-3, 1): inside [-4, 3] - z
    for late in (None, 9.0, math.nan):
        x = base.clone()
        if late is not None:
            x[3, 5, 15] = late  # in the last 64-element chunk
        xg = x.clone().requires_grad_(True)
        dy = grad_y_for(x)
        with kernel_path("recompute", chunk=64):
            if learnable:
                y = learnable_fake_quantize(xg, scale.clone().requires_grad_(True), zp, -4, 3, ch_axis=ch_axis)
            else:
                y = fake_quantize(xg, scale, zp, -4, 3, ch_axis=ch_axis)
            (dx,) = torch.autograd.grad(y, (xg,), dy)
        expected = dy.clone()
        if late is not None:
            expected[3, 5, 15] = 0.0
        assert_bits_equal(dx, expected, f"dX with {late} in the last chunk")
        assert (dx.data_ptr() == dy.data_ptr()) == (late is None)


@pytest.mark.parametrize("ch_axis", [None, 1])
@pytest.mark.parametrize("learnable", [True, False])
def test_output_is_not_a_view_so_in_place_ops_after_it_work(ch_axis, learnable) -> None:  # noqa: ANN001
    """A model may apply an in-place op to a fake quantizer's output (ReLU(inplace=True) after an
    activation quantizer). autograd forbids that on a view made inside a custom Function, so the
    output must be a tensor of its own; gradients equal those of the out-of-place op."""
    torch.manual_seed(3)
    x0 = torch.randn(2, 3, 4, 5) * 3
    scale = torch.tensor([0.05, 0.1, 0.2]) if ch_axis is not None else torch.tensor([0.1])
    zero_point = torch.zeros_like(scale)
    grads = []
    for in_place in (True, False):
        x = x0.clone().requires_grad_(True)
        if learnable:
            y = learnable_fake_quantize(x, scale, zero_point, -8, 7, ch_axis=ch_axis)
        else:
            y = fake_quantize(x, scale, zero_point, -8, 7, ch_axis=ch_axis)
        assert y._base is None
        out = y.relu_() if in_place else y.relu()
        (out * torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        grads.append(x.grad)
    assert_bits_equal(grads[0], grads[1], "dX after an in-place ReLU")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "ch_axis"), [((0,), None), ((0, 3), 1), ((3, 0), 0), ((2, 0, 4), -1), ((0,), 0)]
)
def test_empty_input(dtype: torch.dtype, shape: tuple[int, ...], ch_axis: int | None) -> None:
    """Empty in, empty out; dS = dZ = 0 (the policy; torch returns dS = s, dZ = z)."""
    x = torch.empty(shape, dtype=dtype)
    channels = 1 if ch_axis is None else shape[ch_axis]
    case = FQCase(x, torch.full((channels,), 0.3), torch.full((channels,), 5.0), 0, 255, ch_axis)
    got = run(case)
    assert got.y.shape == x.shape and got.y.dtype == dtype
    assert got.grad_x.shape == x.shape
    assert got.grad_scale.shape == (channels,) and got.grad_zero_point.shape == (channels,)
    assert bool((got.grad_scale == 0).all()) and bool((got.grad_zero_point == 0).all())
    y = fake_quantize(x, case.scale, case.zero_point, 0, 255, ch_axis=ch_axis)
    assert y.shape == x.shape and y.dtype == dtype


@settings(max_examples=75)
@given(
    dtype=st.sampled_from(DTYPES),
    qrange=quant_ranges(16),
    s=scales(),
    ch=st.integers(1, 3),
    data=st.data(),
)
def test_zero_maps_to_positive_zero(dtype, qrange, s, ch, data) -> None:  # noqa: ANN001
    qmin, qmax = qrange
    if dtype in (torch.float16, torch.bfloat16):
        qmin, qmax = max(qmin, -64), min(qmax, 63)
    zps = [data.draw(zero_points(qmin, qmax)) for _ in range(ch)]
    x = torch.tensor([[0.0, -0.0]] * ch, dtype=dtype)
    case = FQCase(x, torch.full((ch,), s), torch.tensor(zps), qmin, qmax, 0)
    positive_zero = torch.zeros_like(x)
    assert_bits_equal(run(case).y, positive_zero, "per-channel learnable")
    assert_bits_equal(fake_quantize(x, case.scale, case.zero_point, qmin, qmax, ch_axis=0), positive_zero, "fake_quantize")
    flat = FQCase(x.reshape(-1), case.scale[:1], case.zero_point[:1], qmin, qmax, None)
    assert_bits_equal(run(flat).y, positive_zero.reshape(-1), "per-tensor learnable")


@settings(max_examples=75)
@given(
    qrange=quant_ranges(16),
    dtype=st.sampled_from(DTYPES),
    exponent=st.integers(-8, 4),
    data=st.data(),
)
@example(qrange=(-128, 127), dtype=torch.float32, exponent=0, data=(1, 0))  # odd z: 0.5 -> 0, not 1
@example(qrange=(-128, 127), dtype=torch.float32, exponent=-3, data=(3, 1))  # odd z: 1.5 -> 2
@example(qrange=(-128, 127), dtype=torch.float16, exponent=-2, data=(-5, 2))  # odd negative z: 2.5 -> 2
@example(qrange=(0, 255), dtype=torch.float32, exponent=-4, data=(3, -4))  # qmin - 1/2, odd z: -3.5 -> -4, clamped
@example(qrange=(0, 255), dtype=torch.float32, exponent=-4, data=(4, -5))  # qmin - 1/2, even: -4.5 -> -4, inside
@example(qrange=(0, 255), dtype=torch.float64, exponent=1, data=(0, 255))  # qmax + 1/2: 255.5 -> 256, clamped
@example(qrange=(0, 255), dtype=torch.float32, exponent=1, data=(1, 254))  # qmax + 1/2: 254.5 -> 254, inside
@example(qrange=(-8, 7), dtype=torch.bfloat16, exponent=0, data=(-1, 7))  # qmax + 1/2 with odd negative z
def test_ties_round_half_to_even(qrange, dtype, exponent, data) -> None:  # noqa: ANN001
    """x = (k + 1/2) s with a power-of-two s: q = round_half_even(k + 1/2) + z, in forward and backward."""
    qmin, qmax = qrange
    if isinstance(data, tuple):
        z, k = data
    else:
        z = data.draw(st.integers(qmin, qmax))
        k = data.draw(st.integers(qmin - z - 2, qmax - z + 1))
    u = k + 0.5
    s = 2.0**exponent
    x = torch.tensor([u * s], dtype=dtype)
    assume(float(x) == u * s)  # exactly representable in the dtype
    q = round(u) + z  # Python rounds half to even
    inside = qmin <= q <= qmax
    qc = min(max(q, qmin), qmax)
    case = FQCase(x, torch.tensor([s]), torch.tensor([float(z)]), qmin, qmax, None)
    got = run(case, grad_y=torch.ones_like(x))
    assert float(got.y) == (qc - z) * s
    assert float(got.grad_x) == (1.0 if inside else 0.0)
    expected_ds = (round(u) - u) if inside else (qmin - z if q < qmin else qmax - z)
    assert float(got.grad_scale) == expected_ds
    assert float(got.grad_zero_point) == (0.0 if inside else -s)
    assert float(fake_quantize(x, s, z, qmin, qmax)) == (qc - z) * s


# ---------------------------------------------------------------------------------------------
# Against torch's kernels where they are right.


@settings(max_examples=75)
@given(case=fq_cases(per_channel=False, dtypes=(torch.float32, torch.float16, torch.bfloat16), integer_zero_point=True))
def test_forward_bit_identical_to_torch_per_tensor(case: FQCase) -> None:
    assume(case.quant_min <= 0 <= case.quant_max)
    z = int(case.zero_point)
    theirs = torch.fake_quantize_per_tensor_affine(case.x, float(case.scale), z, case.quant_min, case.quant_max)
    assert_bits_equal(run(case).y, theirs, "learnable_fake_quantize vs torch")
    assert_bits_equal(fake_quantize(case.x, float(case.scale), z, case.quant_min, case.quant_max), theirs, "fake_quantize vs torch")


@settings(max_examples=75)
@given(case=fq_cases(per_channel=True, dtypes=(torch.float32, torch.float16, torch.bfloat16), integer_zero_point=True))
def test_forward_bit_identical_to_torch_per_channel(case: FQCase) -> None:
    """Also for negative axes, which torch rejects: ours with -1 equals torch with ndim - 1."""
    theirs = torch.fake_quantize_per_channel_affine(
        case.x, case.scale, case.zero_point.to(torch.int32), case.axis, case.quant_min, case.quant_max
    )
    assert_bits_equal(run(case).y, theirs, "learnable_fake_quantize vs torch")
    mine = fake_quantize(case.x, case.scale, case.zero_point, case.quant_min, case.quant_max, ch_axis=case.ch_axis)
    assert_bits_equal(mine, theirs, "fake_quantize vs torch")


def _away_from_torch_bugs(case: FQCase) -> bool:
    """No rounding tie in u = x * (1/s) (torch's CPU backward rounds u + z), nothing empty."""
    _, u = grid_position(case)
    frac = (u - torch.floor(u) - 0.5).abs()
    return case.x.numel() > 0 and bool((frac > 1e-3).all())


def _torch_learnable(case: FQCase, dy: torch.Tensor, grad_factor: float):  # noqa: ANN202
    x = case.x.clone().requires_grad_(True)
    s = case.scale.clone().requires_grad_(True)
    z = case.zero_point.clone().requires_grad_(True)
    if case.ch_axis is None:
        y = torch._fake_quantize_learnable_per_tensor_affine(x, s, z, case.quant_min, case.quant_max, grad_factor)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(x, s, z, case.axis, case.quant_min, case.quant_max, grad_factor)
    return (y.detach(), *torch.autograd.grad(y, (x, s, z), dy))


def _assert_grads_match_torch(case: FQCase, grad_factor: float) -> None:
    dy = grad_y_for(case.x)
    mine = run(case, grad_y=dy, grad_factor=grad_factor)
    y, dx, ds, dz = _torch_learnable(case, dy, grad_factor)
    assert_bits_equal(mine.y, y, "forward")
    assert torch.equal(mine.grad_x, dx), "dX"  # values: torch's masked zeros carry dY's sign
    _, u = grid_position(case)
    # |u| + 1 bounds every dS term (inside |round(u) - u| <= 1/2; outside |q_edge - z| < |u| + 1)
    # and torch's per-term rounding ((x_fq - x)/s carries ~eps |u|).
    bound = dy.double().abs() * (u.abs() + 1)
    tol_s = 4 * summation_tol(bound, case) * grad_factor
    tol_z = 4 * summation_tol(dy.double(), case) * case.scale.double() * grad_factor
    assert bool(((mine.grad_scale.double() - ds.double()).abs() <= tol_s).all()), (mine.grad_scale, ds, tol_s)
    assert bool(((mine.grad_zero_point.double() - dz.double()).abs() <= tol_z).all()), (mine.grad_zero_point, dz, tol_z)


@settings(max_examples=50)
@given(
    case=fq_cases(per_channel=False, dtypes=(torch.float32,), integer_zero_point=True, ties=False, nonnegative_zero_point=True),
    grad_factor=st.sampled_from([1.0, 0.3]),
)
def test_gradients_match_torch_learnable_per_tensor(case: FQCase, grad_factor: float) -> None:
    # torch's per-tensor backward mis-rounds negative zero points (see the bug test below).
    assert float(case.zero_point) >= 0
    assume(_away_from_torch_bugs(case))
    _assert_grads_match_torch(case, grad_factor)


@settings(max_examples=50)
@given(
    case=fq_cases(per_channel=True, dtypes=(torch.float32,), integer_zero_point=True, ties=False),
    grad_factor=st.sampled_from([1.0, 0.3]),
)
def test_gradients_match_torch_learnable_per_channel(case: FQCase, grad_factor: float) -> None:
    assume(case.x.dim() >= 2 and _away_from_torch_bugs(case))  # torch fails on 1-D per-channel
    _assert_grads_match_torch(case, grad_factor)


def test_eq_fake_quantize_matches_torch_fake_quantize_module() -> None:
    """Same observer, same data: identical qparams and bit-identical outputs, per tensor and per channel."""
    torch.manual_seed(0)
    configs = [
        dict(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8),
        dict(observer=tq.PerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
             qscheme=torch.per_channel_symmetric, ch_axis=1),
    ]
    for kwargs in configs:
        mine, theirs = EQFakeQuantize(**kwargs), tq.FakeQuantize(**kwargs)
        for _ in range(3):
            x = torch.randn(4, 6, 5) * 3 + 1
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            ya, yb = mine(xa), theirs(xb)
            assert_bits_equal(ya.detach(), yb.detach())
            dy = torch.randn_like(x)
            ya.backward(dy)
            yb.backward(dy)
            assert torch.equal(xa.grad, xb.grad), "dX"
        assert torch.equal(mine.scale, theirs.scale) and torch.equal(mine.zero_point, theirs.zero_point)


# ---------------------------------------------------------------------------------------------
# torch's bugs at the edges: ours is consistent (the requirement); torch's behaviour is recorded.


def _torch_grads(x, scale, zero_point, qmin, qmax, *, axis=None, dy=None):  # noqa: ANN001, ANN202
    x = x.clone().requires_grad_(True)
    scale = scale.clone().requires_grad_(True)
    zero_point = zero_point.clone().requires_grad_(True)
    if axis is None:
        y = torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, qmin, qmax, 1.0)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(x, scale, zero_point, axis, qmin, qmax, 1.0)
    dy = torch.ones_like(y) if dy is None else dy
    return (y.detach(), *torch.autograd.grad(y, (x, scale, zero_point), dy))


@pytest.mark.parametrize(("zero_point", "forward_z", "torch_backward_z"), [(-2.0, -2, -1), (2.5, 2, 3)])
def test_torch_bug_per_tensor_backward_rounds_zero_point_differently(zero_point, forward_z, torch_backward_z) -> None:  # noqa: ANN001
    qmin, qmax = -4, 4
    x = torch.arange(-8.0, 9.0)
    case = FQCase(x, torch.tensor([1.0]), torch.tensor([zero_point]), qmin, qmax, None)
    mine = run(case)
    # Ours: one zero point (rounded half to even) in forward and backward.
    q = torch.round(x) + forward_z
    inside = (q >= qmin) & (q <= qmax)
    assert_bits_equal(mine.y, (q.clamp(qmin, qmax) - forward_z) * 1.0)
    assert_bits_equal(mine.grad_x, inside.float(), "our dX must follow our forward's zero point")
    assert float(mine.grad_zero_point) == -float((~inside).sum())
    assert float(mine.grad_scale) == float(((q < qmin).float() * (qmin - forward_z) + (q > qmax).float() * (qmax - forward_z)).sum())
    # torch: the forward agrees with ours, the backward's mask is that of another zero point.
    y, dx, _, _ = _torch_grads(x, case.scale, case.zero_point, qmin, qmax)
    assert_bits_equal(y, mine.y, "torch's forward")
    torch_q = torch.round(x) + torch_backward_z
    torch_mask = ((torch_q >= qmin) & (torch_q <= qmax)).float()
    assert torch.equal(dx, torch_mask) and not torch.equal(dx, mine.grad_x), (
        f"torch's per-tensor backward no longer uses z={torch_backward_z} for z={zero_point}: "
        f"dX {dx.tolist()}; if fixed, it now agrees with ours {mine.grad_x.tolist()}"
    )


def test_torch_bug_cpu_backward_adds_zero_point_before_rounding() -> None:
    """Ties with an odd zero point: torch's dS rounds u + z, its forward rounds u."""
    qmin, qmax, z, s = -128, 127, 1.0, 0.25
    for u in (0.5, 2.5, -1.5, 7.5, -6.5):
        case = FQCase(torch.tensor([u * s]), torch.tensor([s]), torch.tensor([z]), qmin, qmax, None)
        mine = run(case, grad_y=torch.ones(1))
        assert float(mine.y) == round(u) * s  # Python rounds half to even
        # Ours: dS inside is exactly y/s - x/s, consistent with the forward.
        assert float(mine.grad_scale) == round(u) - u == float(mine.y) / s - u
        y, _, ds, _ = _torch_grads(case.x, case.scale, case.zero_point, qmin, qmax)
        assert float(y) == float(mine.y), "torch's forward"
        torch_term = round(u + z) - z - u
        assert float(ds) == torch_term == -float(mine.grad_scale), (
            f"torch's CPU backward no longer rounds u + z at u={u}, z={z}: dS {float(ds)} (ours {float(mine.grad_scale)})"
        )


def test_torch_bug_empty_input_returns_scale_and_zero_point_as_grads() -> None:
    case = FQCase(torch.zeros(0), torch.tensor([0.3]), torch.tensor([5.0]), 0, 255, None)
    mine = run(case)
    assert float(mine.grad_scale) == 0.0 and float(mine.grad_zero_point) == 0.0
    _, _, ds, dz = _torch_grads(case.x, case.scale, case.zero_point, 0, 255)
    ds, dz = ds.detach(), dz.detach()  # torch hands back its own scale/zero_point tensors
    assert (float(ds), float(dz)) == pytest.approx((0.3, 5.0)), (
        f"torch's empty-input grads changed: dS={float(ds)}, dZ={float(dz)} (ours 0, 0)"
    )


def test_torch_bug_1d_per_channel_backward_fails() -> None:
    x = torch.tensor([0.3, -7.0, 2.6, 40.0])
    scale, zp = torch.tensor([0.5, 1.0, 0.25, 2.0]), torch.tensor([0.0, 3.0, -2.0, 1.0])
    case = FQCase(x, scale, zp, -8, 7, 0)
    mine = run(case)
    for c in range(4):  # each element is its own channel: per-tensor with that channel's qparams
        one = run(FQCase(x[c : c + 1], scale[c : c + 1], zp[c : c + 1], -8, 7, None))
        assert_bits_equal(mine.y[c : c + 1], one.y)
        assert_bits_equal(mine.grad_x[c : c + 1], one.grad_x)
        assert_bits_equal(mine.grad_scale[c : c + 1], one.grad_scale)
        assert_bits_equal(mine.grad_zero_point[c : c + 1], one.grad_zero_point)
    check_fake_quantize(ours, x, scale, zp, -8, 7, ch_axis=0)
    with pytest.raises(RuntimeError, match="invalid gradient"):
        _torch_grads(x, scale, zp, -8, 7, axis=0)


@pytest.mark.parametrize("ndim", [2, 3, 4])
def test_torch_bug_negative_axes_rejected(ndim: int) -> None:
    torch.manual_seed(ndim)
    shape = [2, 3, 4, 5][:ndim]
    x = torch.randn(shape) * 4
    channels = shape[-1]
    scale, zp = torch.rand(channels) + 0.1, torch.randint(-3, 4, (channels,)).float()
    negative = run(FQCase(x, scale, zp, -8, 7, -1))
    positive = run(FQCase(x, scale, zp, -8, 7, ndim - 1))
    for a, b in zip(negative.__dict__.values(), positive.__dict__.values()):
        assert_bits_equal(a, b)
    with pytest.raises(RuntimeError, match="axis"):
        torch.fake_quantize_per_channel_affine(x, scale, zp.int(), -1, -8, 7)
    with pytest.raises(RuntimeError, match="axis"):
        _torch_grads(x, scale, zp, -8, 7, axis=-1)


def test_torch_bug_nan_and_inf_map_inconsistently() -> None:
    """Ours: +inf -> qmax, -inf -> qmin like any clamped value; NaN stays NaN, dX = 0, dS NaN, dZ -s.

    The policy is the module docstring's. torch maps NaN to qmin in forward but its backward
    treats +inf as below the grid (dS gets qmin - z, not qmax - z).
    """
    nan, inf = float("nan"), float("inf")
    qmin, qmax, z, s = -10, 10, 2.0, 0.5
    x = torch.tensor([inf, -inf, 1.0, nan])
    case = FQCase(x, torch.tensor([s]), torch.tensor([z]), qmin, qmax, None)
    mine = run(case, grad_y=torch.ones(4))
    # Ours, infinities: clamped like any out-of-range value, in forward and backward alike.
    assert mine.y[:3].tolist() == [(qmax - z) * s, (qmin - z) * s, 1.0]
    assert mine.grad_x.tolist() == [0.0, 0.0, 1.0, 0.0]
    finite_part = run(FQCase(x[:3], case.scale, case.zero_point, qmin, qmax, None), grad_y=torch.ones(3))
    assert float(finite_part.grad_scale) == (qmax - z) + (qmin - z) + 0.0
    assert float(finite_part.grad_zero_point) == -2 * s
    # torch: +inf goes to qmax in forward, but its backward counts it as below the grid.
    y, dx, ds, _ = _torch_grads(x[:3], case.scale, case.zero_point, qmin, qmax)
    assert y.tolist() == finite_part.y.tolist() and dx.tolist() == [0.0, 0.0, 1.0]
    assert float(ds) == 2 * (qmin - z) != float(finite_part.grad_scale), (
        f"torch's backward no longer treats +inf as below the grid: dS {float(ds)}"
    )
    torch_nan = torch.fake_quantize_per_tensor_affine(torch.tensor([nan]), s, int(z), qmin, qmax)
    assert float(torch_nan) == (qmin - z) * s, f"torch's forward no longer maps NaN to qmin: {float(torch_nan)}"
    # Ours, NaN: stays NaN, dX = 0, and propagates into dS and dZ (the docstring's policy).
    assert math.isnan(float(mine.y[3]))
    assert math.isnan(float(mine.grad_zero_point)), f"NaN input must make dZ NaN, got {float(mine.grad_zero_point)}"
    assert math.isnan(float(mine.grad_scale)), f"NaN input must make dS NaN (docstring policy), got {float(mine.grad_scale)}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_torch_bug_half_and_double_backward_fails(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    x = (torch.randn(3, 5) * 4).to(dtype)
    scale, zp = torch.tensor([0.125, 0.5, 0.25]), torch.tensor([1.0, -3.0, 0.0])
    for ch_axis in (None, 0):
        s = scale[:1] if ch_axis is None else scale
        z = zp[:1] if ch_axis is None else zp
        got = run(FQCase(x, s, z, -8, 7, ch_axis))
        assert got.y.dtype == dtype and got.grad_x.dtype == dtype
        check_fake_quantize(ours, x, s, z, -8, 7, ch_axis=ch_axis)
        with pytest.raises(RuntimeError, match="Float"):
            _torch_grads(x, s, z, -8, 7, axis=ch_axis)


# ---------------------------------------------------------------------------------------------
# Bad arguments: one ValueError that names the argument.


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_bad_scale_raises(bad: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        fake_quantize(torch.ones(3), bad, 0, 0, 255)
    with pytest.raises(ValueError, match="scale"):
        EQLearnableFakeQuantize(scale=bad)


@pytest.mark.parametrize(
    ("qmin", "qmax", "match"),
    [(5, 5, "quant_min"), (10, 3, "quant_min"), (0, 65536, "16 bits"), (-32769, 32767, "16 bits"),
     (0.0, 255, "quant_min"), (0, True, "quant_max"), (0, "255", "quant_max")],
)
def test_bad_quant_range_raises(qmin, qmax, match) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        check_quant_range(qmin, qmax)
    with pytest.raises(ValueError, match=match):
        learnable_fake_quantize(torch.ones(3), torch.ones(1), torch.zeros(1), qmin, qmax)
    with pytest.raises(ValueError, match=match):
        fake_quantize(torch.ones(3), 1.0, 0, qmin, qmax)
    with pytest.raises(ValueError, match=match):
        EQLearnableFakeQuantize(quant_min=qmin, quant_max=qmax, dtype=torch.qint32)
    with pytest.raises(ValueError, match=match):
        EQFakeQuantize(quant_min=qmin, quant_max=qmax, dtype=torch.qint32)


def test_widest_ranges_are_accepted() -> None:
    check_quant_range(0, 65535)
    check_quant_range(-32768, 32767)
    check_quant_range(0, 1)


@pytest.mark.parametrize(("axis", "ndim"), [(2, 2), (-3, 2), (5, 4), (0, 0)])
def test_channel_axis_out_of_range_raises(axis: int, ndim: int) -> None:
    with pytest.raises(ValueError, match="ch_axis"):
        normalize_axis(axis, ndim)
    if ndim:
        x = torch.ones([2] * ndim)
        with pytest.raises(ValueError, match="ch_axis"):
            learnable_fake_quantize(x, torch.ones(2), torch.zeros(2), 0, 255, ch_axis=axis)
        with pytest.raises(ValueError, match="ch_axis"):
            fake_quantize(x, torch.ones(2), torch.zeros(2), 0, 255, ch_axis=axis)


def test_normalize_axis_accepts_negative_axes() -> None:
    assert [normalize_axis(a, 3) for a in (-3, -2, -1, 0, 1, 2)] == [0, 1, 2, 0, 1, 2]


def test_wrong_number_of_qparams_raises() -> None:
    x = torch.ones(4, 3)
    with pytest.raises(ValueError, match="one scale"):
        learnable_fake_quantize(x, torch.ones(2), torch.zeros(1), 0, 255)
    with pytest.raises(ValueError, match="zero_point"):
        learnable_fake_quantize(x, torch.ones(1), torch.zeros(3), 0, 255)
    with pytest.raises(ValueError, match="3 scales"):
        learnable_fake_quantize(x, torch.ones(4), torch.zeros(4), 0, 255, ch_axis=1)
    with pytest.raises(ValueError, match="4 scales"):
        fake_quantize(x, torch.ones(3), torch.zeros(3), 0, 255, ch_axis=0)
    with pytest.raises(ValueError, match="zero points"):
        learnable_fake_quantize(x, torch.ones(3), torch.zeros(2), 0, 255, ch_axis=-1)
    with pytest.raises(ValueError, match="at least one dimension"):
        learnable_fake_quantize(torch.tensor(1.0), torch.ones(1), torch.zeros(1), 0, 255, ch_axis=0)


def test_integer_input_raises() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        learnable_fake_quantize(torch.ones(3, dtype=torch.int32), torch.ones(1), torch.zeros(1), 0, 255)


def test_channel_len_mismatch_raises() -> None:
    module = EQLearnableFakeQuantize(
        observer=tq.PerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric, ch_axis=0, channel_len=4,
    )
    with pytest.raises(ValueError, match="channel_len"):
        module(torch.randn(3, 5))
    module.enable_param_learning()
    with pytest.raises(ValueError, match="channel_len"):
        module(torch.randn(5, 4))  # 4 channels, but on the wrong axis
    assert module(torch.randn(4, 5)).shape == (4, 5)
    for bad in (0, -2, 2.0):
        with pytest.raises(ValueError, match="channel_len"):
            EQLearnableFakeQuantize(channel_len=bad)


@pytest.mark.parametrize(
    ("dtype", "qmin", "qmax"),
    [(torch.quint8, 0, 511), (torch.qint8, -129, 127), (torch.quint8, -1, 254), (torch.qint8, -128, 255)],
)
def test_observer_dtype_too_narrow_raises(dtype: torch.dtype, qmin: int, qmax: int) -> None:
    for cls in (EQLearnableFakeQuantize, EQFakeQuantize):
        with pytest.raises(ValueError, match="dtype"):
            cls(observer=tq.MinMaxObserver, quant_min=qmin, quant_max=qmax, dtype=dtype)
    with pytest.raises(ValueError, match="dtype"):  # dtype given through with_args
        EQLearnableFakeQuantize(observer=tq.MinMaxObserver.with_args(dtype=dtype), quant_min=qmin, quant_max=qmax)
