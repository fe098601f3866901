"""pytest_easyquant.strategies: the strategies keep their promises, and docs/property-testing.md's
example (run from the doc itself) passes, and the checker catches the buggy variants."""

from __future__ import annotations

import importlib
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from eqcore.quant.functional import check_quant_range, learnable_fake_quantize
from eqcore.testing import reference_fake_quantize, run_fake_quantize
from pytest_easyquant.strategies import (
    FakeQuantCase,
    QParams,
    fake_quant_cases,
    grid_values,
    qparams,
    quant_ranges,
    shapes,
)

ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DOC = Path(__file__).resolve().parents[1] / "docs" / "property-testing.md"
# Finding an example is the point; shrinking it to the smallest one would only cost time.
FIND = settings(database=None, max_examples=300, phases=(Phase.generate,))


def channel_view(t: torch.Tensor, ndim: int, ch_axis: int | None) -> torch.Tensor:
    shape = [1] * ndim
    if ch_axis is not None:
        shape[ch_axis] = -1
    return t.reshape(shape)


def grid_coordinates(case: FakeQuantCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, q, z) in float64 and broadcast over x: u = x / s exactly, q = round(u) + z."""
    s = channel_view(case.scale.double(), case.x.dim(), case.ch_axis)
    z = torch.round(channel_view(case.zero_point.double(), case.x.dim(), case.ch_axis))
    z = z.clamp(case.quant_min, case.quant_max)
    u = case.x.double() / s
    return u, torch.round(u) + z, z.expand_as(u)


def regions(case: FakeQuantCase) -> dict[str, torch.Tensor]:
    u, q, _ = grid_coordinates(case)
    return {
        "below": q < case.quant_min,
        "above": q > case.quant_max,
        "inside": (q >= case.quant_min) & (q <= case.quant_max),
        "bound": (q == case.quant_min) | (q == case.quant_max),
        "tie": (u - torch.floor(u)) == 0.5,
    }


def power_of_two(value: float) -> bool:
    return math.frexp(value)[0] == 0.5


def roundings_agree(case: FakeQuantCase) -> bool:
    """x / s and x * (1/s), in the compute dtype and exactly, all round to the same integer."""
    s = channel_view(case.scale, case.x.dim(), case.ch_axis)
    compute = torch.float64 if case.x.dtype == torch.float64 else torch.float32
    x, s = case.x.to(compute), s.to(compute)
    candidates = [x / s, x * torch.reciprocal(s), case.x.double() / s.double()]
    rounded = [torch.round(u.double()) for u in candidates]
    return all(torch.equal(rounded[0], r) for r in rounded[1:])


# ---------------------------------------------------------------------------------------------
# The doc's example, run from the doc.


def load_doc_example() -> types.ModuleType:
    """The doc's ```python blocks as one module; every other line is blank, so tracebacks point at
    the doc's own line numbers."""
    lines, keep = [], False
    for line in DOC.read_text().splitlines():
        if line.strip().startswith("```"):
            keep = line.strip() == "```python"
            lines.append("")
            continue
        lines.append(line if keep else "")
    module = types.ModuleType("property_testing_doc")
    module.__file__ = str(DOC)
    exec(compile("\n".join(lines), str(DOC), "exec"), module.__dict__)  # noqa: S102 - our own doc
    return module


DOC_EXAMPLE = load_doc_example()
DOC_TESTS = sorted(name for name in vars(DOC_EXAMPLE) if name.startswith("test_"))


def test_doc_defines_the_documented_tests() -> None:
    assert DOC_TESTS == [
        "test_autograd_fake_quant",
        "test_my_fake_quant",
        "test_my_fake_quant_learned_zero_points",
        "test_the_checker_catches_clamping_before_rounding",
    ]


@pytest.mark.parametrize("name", DOC_TESTS)
def test_doc_example(name: str) -> None:
    getattr(DOC_EXAMPLE, name)()


def test_doc_shows_the_report_the_checker_gives() -> None:
    """The doc quotes the shrunk case and its report; on torch 2.14 they are exactly these."""
    fn = DOC_EXAMPLE.lsq_paper_fake_quant
    case = find(fake_quant_cases(power_of_two=True), lambda c: not c.check(fn, raise_on_failure=False).ok, settings=FIND)
    quoted = re.search(r"```text\n(.*?)```", DOC.read_text(), re.S).group(1).splitlines()
    bound = torch.tensor(1.0, requires_grad=True)
    torch.clamp(bound, 0.0, 1.0).backward()
    if float(bound.grad) != 0.0:
        pytest.skip("this torch's clamp passes the gradient on its bounds; the quoted case is torch 2.14's")
    assert [repr(case), *case.check(fn, raise_on_failure=False).failures] == quoted


def test_doc_example_passes_on_arbitrary_scales_with_its_own_backward() -> None:
    """The doc's claim: on arbitrary scales an autograd-only backward fails only by dX = dY * s / s
    being an ulp off, where a custom backward (dX = dY itself) passes."""
    autograd_fn = DOC_EXAMPLE.autograd_fake_quant
    case = find(
        fake_quant_cases(power_of_two=False), lambda c: not c.check(autograd_fn, raise_on_failure=False).ok, settings=FIND
    )
    assert case.check(autograd_fn, raise_on_failure=False).failures == ["dX is not dY masked to the inside of the grid"]
    case.check(DOC_EXAMPLE.my_fake_quant)
    axis = None if case.ch_axis is None else case.ch_axis % case.x.dim()
    dy = torch.linspace(-1.0, 1.0, case.x.numel()).reshape(case.x.shape)  # the checker's dY
    args = (case.x, case.scale, case.zero_point, case.quant_min, case.quant_max)
    got = run_fake_quantize(autograd_fn, *args, ch_axis=axis, grad_y=dy).grad_x.double()
    want = reference_fake_quantize(*args, ch_axis=axis, grad_y=dy).grad_x
    assert bool(((got - want).abs() <= torch.finfo(torch.float32).eps * want.abs()).all())


# ---------------------------------------------------------------------------------------------
# The checker catches buggy fake quantizers.


CLAMPS = {
    "torch.clamp": lambda q, lo, hi: torch.clamp(q, lo, hi),
    "hardtanh": lambda q, lo, hi: F.hardtanh(q, lo, hi),
    "minimum/maximum": lambda q, lo, hi: torch.maximum(torch.minimum(q, torch.tensor(float(hi))), torch.tensor(float(lo))),
}


@pytest.mark.parametrize("clamp", CLAMPS)
def test_checker_flags_a_clamp_whose_gradient_on_the_bounds_is_not_one(clamp: str) -> None:
    """Straight-through rounding, then a clamp: right iff the clamp's gradient on a bound is 1."""
    clamp_fn = CLAMPS[clamp]

    def fake_quant(x, scale, zero_point, quant_min, quant_max, ch_axis, grad_factor):  # noqa: ANN001, ANN202
        z = zero_point + (torch.round(zero_point) - zero_point).detach()
        u = x / scale
        q = clamp_fn(u + (torch.round(u) - u).detach() + z, quant_min, quant_max)
        return (q - z) * scale

    on_bound = torch.tensor([3.0], requires_grad=True)
    clamp_fn(on_bound, -2, 3).backward()
    # s = 0.5, z = 0, range 0..3: q = 0 and 3 (on the bounds), 2 (a tie, inside), -2 and 4 (outside).
    x = torch.tensor([0.0, 1.5, 0.75, -1.0, 2.0])
    report = check_case(fake_quant, x, 0.5, 0.0, 0, 3)
    if float(on_bound.grad) == 1.0:
        assert report.ok, report.failures
    else:
        assert "dX is not dY masked to the inside of the grid" in report.failures


def check_case(fn, x, s, z, quant_min, quant_max):  # noqa: ANN001, ANN201
    case = FakeQuantCase(x, torch.tensor([s]), torch.tensor([z]), quant_min, quant_max, None, 1.0)
    return case.check(fn, raise_on_failure=False)


class RoundsZeroPointUpInBackward(torch.autograd.Function):
    """The doc's LSQ+ function with torch's per-tensor bug: the backward recomputes the mask with
    floor(z + 1/2) (round half up) where the forward rounded z half to even."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, ch_axis, grad_factor):  # noqa: ANN001, ANN205
        y = DOC_EXAMPLE.LSQPlusFakeQuantize.forward(ctx, x, scale, zero_point, quant_min, quant_max, ch_axis, grad_factor)
        ctx.save_for_backward(x, scale, zero_point)  # replaces what the doc's forward saved
        ctx.rest = quant_min, quant_max, ch_axis, grad_factor
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        x, scale, zero_point = ctx.saved_tensors
        quant_min, quant_max, ch_axis, g = ctx.rest
        shape = [1] * x.dim()
        if ch_axis is not None:
            shape[ch_axis] = -1
        s, z = scale.reshape(shape), torch.floor(zero_point + 0.5).reshape(shape)
        u = x / s
        q = torch.round(u) + z
        below, above = q < quant_min, q > quant_max
        inside = ~(below | above)
        grad_s = grad_y * torch.where(inside, torch.round(u) - u, torch.where(below, quant_min - z, quant_max - z))
        grad_z = grad_y * torch.where(inside, 0.0, -s)
        return (
            grad_y * inside, grad_s.sum_to_size(s.shape).reshape(-1) * g, grad_z.sum_to_size(s.shape).reshape(-1) * g,
            None, None, None, None,
        )


def rounds_zero_point_up(x, scale, zero_point, quant_min, quant_max, ch_axis, grad_factor):  # noqa: ANN001, ANN201
    return RoundsZeroPointUpInBackward.apply(x, scale, zero_point, quant_min, quant_max, ch_axis, grad_factor)


def test_checker_catches_a_zero_point_rounded_differently_in_backward() -> None:
    # z = 2.5: the forward uses 2, the backward 3, so the backward's grid is one step off.
    x = torch.arange(-8.0, 9.0)
    with pytest.raises(AssertionError, match="dX is not dY masked"):
        check_case(rounds_zero_point_up, x, 1.0, 2.5, -4, 4).raise_if_failed()
    assert check_case(rounds_zero_point_up, x, 1.0, 2.0, -4, 4).ok
    # Hypothesis finds it from learned (fractional) zero points.
    case = find(
        fake_quant_cases(integer_zero_point=False),
        lambda c: not c.check(rounds_zero_point_up, raise_on_failure=False).ok,
        settings=FIND,
    )
    z = case.zero_point.double()
    assert bool((torch.round(z) != torch.floor(z + 0.5)).any()), case


@settings(max_examples=40)
@given(case=fake_quant_cases(integer_zero_point=True))
def test_the_zero_point_bug_is_invisible_with_integer_zero_points(case: FakeQuantCase) -> None:
    case.check(rounds_zero_point_up)


# ---------------------------------------------------------------------------------------------
# Our own quantizer passes.


def ours(x, scale, zero_point, quant_min, quant_max, ch_axis, grad_factor):  # noqa: ANN001, ANN201
    return learnable_fake_quantize(x, scale, zero_point, quant_min, quant_max, ch_axis=ch_axis, grad_factor=grad_factor)


@settings(max_examples=100)
@given(case=fake_quant_cases(dtypes=ALL_DTYPES, ties="near", integer_zero_point=False))
def test_learnable_fake_quantize_passes_the_checker(case: FakeQuantCase) -> None:
    case.check(ours)


@settings(max_examples=30)
@given(case=fake_quant_cases(quant_range=quant_ranges(min_bits=9, max_bits=16), margin=40))
def test_learnable_fake_quantize_passes_on_wide_ranges(case: FakeQuantCase) -> None:
    case.check(ours)


# ---------------------------------------------------------------------------------------------
# quant_ranges.


@given(qrange=quant_ranges(min_bits=1, max_bits=16))
def test_quant_ranges_are_valid(qrange: tuple[int, int]) -> None:
    quant_min, quant_max = qrange
    check_quant_range(quant_min, quant_max)
    levels = quant_max - quant_min + 1
    bits = math.ceil(math.log2(levels))
    assert quant_min in (0, -(2 ** (bits - 1)), -(2 ** (bits - 1)) + 1)
    assert quant_max == (2**bits - 1 if quant_min == 0 else 2 ** (bits - 1) - 1)


@given(data=st.data(), signed=st.sampled_from([True, False, None]), narrow=st.sampled_from([True, False, None]))
def test_quant_ranges_options(data: st.DataObject, signed: bool | None, narrow: bool | None) -> None:
    if narrow and signed is False:
        with pytest.raises(InvalidArgument, match="narrow"):
            quant_ranges(signed=signed, narrow=narrow)
        return
    quant_min, quant_max = data.draw(quant_ranges(min_bits=3, max_bits=6, signed=signed, narrow=narrow))
    assert 2**3 - 1 <= quant_max - quant_min + 1 <= 2**6
    if signed is not None:
        assert (quant_min < 0) == (signed or bool(narrow))
    if narrow:
        assert quant_min == -quant_max
    elif narrow is False:
        assert quant_min in (0, -quant_max - 1)


@pytest.mark.parametrize(
    ("options", "expected"),
    [({"signed": False}, (0, 255)), ({"signed": True, "narrow": False}, (-128, 127)), ({"narrow": True}, (-127, 127))],
)
def test_quant_ranges_reach_every_kind_of_8_bit_range(options: dict, expected: tuple[int, int]) -> None:
    assert find(quant_ranges(**options), lambda r: r == expected, settings=FIND) == expected


# ---------------------------------------------------------------------------------------------
# qparams.


@given(params=qparams(symmetric=True, per_channel=None))
def test_symmetric_qparams_have_zero_point_zero_on_a_signed_range(params: QParams) -> None:
    assert bool((params.zero_point == 0).all())
    assert params.quant_min < 0 < params.quant_max


@given(params=qparams(power_of_two=True, per_channel=True, scale_exponents=(-12, 6)))
def test_power_of_two_scales_are_exact_powers_of_two(params: QParams) -> None:
    for s in params.scale.tolist():
        assert power_of_two(s) and -12 <= math.log2(s) <= 6, s


@given(params=qparams(per_channel=None, integer_zero_point=False, scale_exponents=(-3, 2)))
def test_qparams_are_in_range(params: QParams) -> None:
    assert params.scale.dtype == params.zero_point.dtype == torch.float32
    assert params.scale.shape == params.zero_point.shape == (params.channels,)
    assert bool(((params.scale >= 2.0**-3) & (params.scale <= 4.0)).all())
    assert bool(((params.zero_point >= params.quant_min) & (params.zero_point <= params.quant_max)).all())
    assert params.per_channel or params.channels == 1
    z = params.effective_zero_point()
    assert all(params.quant_min <= v <= params.quant_max for v in z)


def test_integer_zero_point_false_draws_learned_zero_points_including_ties() -> None:
    tie = find(qparams(integer_zero_point=False), lambda p: float(p.zero_point) % 1 == 0.5, settings=FIND)
    assert float(tie.zero_point) % 1 == 0.5
    negative = find(qparams(integer_zero_point=False), lambda p: float(p.zero_point) % 1 == 0.5 and float(p.zero_point) < 0, settings=FIND)
    assert negative.effective_zero_point()[0] == round(float(negative.zero_point))  # half to even, like torch


@given(params=qparams(per_channel=True, channels=st.integers(2, 3), ch_axis=-2, quant_range=(-8, 7), dtype=torch.float64))
def test_qparams_take_channels_axis_range_and_dtype(params: QParams) -> None:
    assert params.channels in (2, 3) and params.ch_axis == -2
    assert (params.quant_min, params.quant_max) == (-8, 7)
    assert params.scale.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# shapes.


@given(shape=shapes(min_dims=0, max_dims=5, min_side=0, max_side=7, max_numel=30))
def test_shapes_respect_their_bounds(shape: tuple[int, ...]) -> None:
    assert 0 <= len(shape) <= 5 and all(0 <= side <= 7 for side in shape)
    assert math.prod(shape) <= 30


@given(shape=shapes())
def test_default_shapes_are_small_and_non_empty(shape: tuple[int, ...]) -> None:
    assert 1 <= len(shape) <= 4 and all(1 <= side <= 6 for side in shape) and math.prod(shape) <= 48


# ---------------------------------------------------------------------------------------------
# grid_values and fake_quant_cases.


@given(case=fake_quant_cases(dtypes=ALL_DTYPES, ties="near", integer_zero_point=False))
def test_values_stay_within_margin_of_the_range(case: FakeQuantCase) -> None:
    u, _, z = grid_coordinates(case)
    low, high = case.quant_min - z - 3.5, case.quant_max - z + 3.5
    # Low-precision dtypes move u by up to a relative ulp of x.
    slack = torch.finfo(case.x.dtype).eps * u.abs()
    assert bool(((u >= low - slack) & (u <= high + slack)).all()), case


@given(case=fake_quant_cases(per_channel=True, dtypes=ALL_DTYPES))
def test_per_channel_shapes_are_consistent(case: FakeQuantCase) -> None:
    assert -case.x.dim() <= case.ch_axis < case.x.dim()
    assert case.scale.shape == case.zero_point.shape == (case.x.shape[case.ch_axis],)
    assert case.x.numel() <= 48


@given(case=fake_quant_cases(per_channel=False))
def test_per_tensor_cases_have_one_scale(case: FakeQuantCase) -> None:
    assert case.ch_axis is None and case.scale.shape == case.zero_point.shape == (1,)


def test_per_channel_cases_use_negative_axes_and_every_dimension() -> None:
    for axis in (-1, -3, 0, 2):
        # ch_axis == -3 needs a 3-d or larger tensor and a negative axis: rare enough to want more draws.
        case = find(fake_quant_cases(per_channel=True), lambda c, a=axis: c.ch_axis == a, settings=settings(FIND, max_examples=3000))
        assert case.x.dim() >= abs(axis)


@pytest.mark.parametrize("per_channel", [False, True])
def test_one_example_can_cover_every_region_in_every_channel(per_channel: bool) -> None:
    def covered(case: FakeQuantCase) -> bool:
        found = regions(case)
        axis = case.ch_axis % case.x.dim() if per_channel else None
        for name in ("below", "above", "inside", "bound", "tie"):
            mask = found[name]
            if axis is None:
                if not bool(mask.any()):
                    return False
            elif not bool(mask.movedim(axis, 0).reshape(mask.shape[axis], -1).any(1).all()):
                return False
        return per_channel == (case.ch_axis is not None) and case.scale.numel() >= (2 if per_channel else 1)

    case = find(fake_quant_cases(per_channel=per_channel, power_of_two=True), covered, settings=FIND)
    assert covered(case)


@pytest.mark.parametrize("region", ["below", "above", "bound", "tie"])
def test_both_clamped_sides_bounds_and_ties_are_hit(region: str) -> None:
    case = find(fake_quant_cases(power_of_two=True), lambda c: bool(regions(c)[region].any()), settings=FIND)
    assert bool(regions(case)[region].any())


@given(case=fake_quant_cases(power_of_two=True, per_channel=None))
def test_ties_on_power_of_two_scales_are_exact_in_every_convention(case: FakeQuantCase) -> None:
    assert roundings_agree(case)
    s = channel_view(case.scale, case.x.dim(), case.ch_axis)
    assert torch.equal((case.x / s).double(), case.x.double() / s.double())


@given(case=fake_quant_cases(dtypes=ALL_DTYPES, power_of_two=None, per_channel=None))
def test_default_ties_never_depend_on_how_x_over_s_is_computed(case: FakeQuantCase) -> None:
    assert roundings_agree(case), case
    u, _, _ = grid_coordinates(case)
    for channel, s in enumerate(case.scale.tolist()):
        if not power_of_two(s):
            in_channel = u if case.ch_axis is None else u.select(case.ch_axis, channel)
            assert not bool(((in_channel - torch.floor(in_channel)) == 0.5).any()), case


@given(case=fake_quant_cases(dtypes=ALL_DTYPES, ties=False, power_of_two=None, integer_zero_point=False))
def test_ties_false_keeps_every_value_away_from_ties(case: FakeQuantCase) -> None:
    u, _, _ = grid_coordinates(case)
    assert bool(((u - torch.floor(u) - 0.5).abs() >= 2.0**-10).all()), case
    assert roundings_agree(case)


def test_near_ties_are_drawn_on_arbitrary_scales() -> None:
    def near_tie(case: FakeQuantCase) -> bool:
        u, _, _ = grid_coordinates(case)
        return not power_of_two(float(case.scale)) and bool(((u - torch.floor(u) - 0.5).abs() < 1e-6).any())

    case = find(fake_quant_cases(ties="near", power_of_two=False, per_channel=False), near_tie, settings=FIND)
    assert near_tie(case)


@given(data=st.data(), params=qparams(per_channel=True, ch_axis=-1, channels=st.integers(1, 3)), margin=st.integers(0, 5))
def test_grid_values_for_given_qparams_and_shape(data: st.DataObject, params: QParams, margin: int) -> None:
    shape = (2, params.channels)
    x = data.draw(grid_values(params, shape, dtype=torch.float64, margin=margin, ties=False))
    assert x.shape == shape and x.dtype == torch.float64
    case = FakeQuantCase(x, params.scale, params.zero_point, params.quant_min, params.quant_max, params.ch_axis, 1.0)
    u, q, z = grid_coordinates(case)
    assert bool(((q >= params.quant_min - margin) & (q <= params.quant_max + margin)).all())
    if margin == 0:
        assert bool(regions(case)["inside"].all())


@given(params=qparams(), shape=shapes(min_dims=0, min_side=0, max_numel=8), data=st.data())
def test_grid_values_handle_scalars_and_empty_tensors(params: QParams, shape: tuple[int, ...], data: st.DataObject) -> None:
    x = data.draw(grid_values(params, shape))
    assert tuple(x.shape) == shape


@given(case=fake_quant_cases())
def test_grad_factor_is_one_a_half_or_lsq(case: FakeQuantCase) -> None:
    lsq = 1.0 / math.sqrt(case.x.numel() * max(case.quant_max, 1))
    assert case.grad_factor in (1.0, 0.5, lsq)


@given(case=fake_quant_cases(grad_factor=st.sampled_from([0.25, 2.0])))
def test_grad_factor_option(case: FakeQuantCase) -> None:
    assert case.grad_factor in (0.25, 2.0)


@given(case=fake_quant_cases(dtypes=ALL_DTYPES, per_channel=None, integer_zero_point=False))
def test_cases_print_as_python_that_rebuilds_them(case: FakeQuantCase) -> None:
    rebuilt = eval(repr(case), {"torch": torch, "FakeQuantCase": FakeQuantCase})  # noqa: S307
    for name in ("x", "scale", "zero_point"):
        a, b = getattr(case, name), getattr(rebuilt, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (rebuilt.quant_min, rebuilt.quant_max, rebuilt.ch_axis, rebuilt.grad_factor) == (
        case.quant_min, case.quant_max, case.ch_axis, case.grad_factor,
    )
    assert eval(repr(case.qparams), {"torch": torch, "QParams": QParams}).ch_axis == case.ch_axis  # noqa: S307


def test_kwargs_are_the_checkers_arguments() -> None:
    case = FakeQuantCase(torch.ones(2, 3), torch.ones(3), torch.zeros(3), -8, 7, -1, 0.5)
    assert case.kwargs() == {
        "x": case.x, "scale": case.scale, "zero_point": case.zero_point,
        "quant_min": -8, "quant_max": 7, "ch_axis": -1, "grad_factor": 0.5,
    }
    assert case.check(ours).ok


def test_drawing_uses_no_global_random_state() -> None:
    def draw_all(seed: int) -> list[str]:
        torch.manual_seed(seed)
        seen: list[str] = []

        @settings(max_examples=15, derandomize=True, database=None)
        @given(case=fake_quant_cases(dtypes=ALL_DTYPES))
        def collect(case: FakeQuantCase) -> None:
            seen.append(repr(case))
            torch.rand(3)  # the test consuming torch's RNG changes nothing either

        collect()
        return seen

    assert draw_all(0) == draw_all(1)


# ---------------------------------------------------------------------------------------------
# Bad arguments and the missing-hypothesis error.


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (quant_ranges, {"min_bits": 0}, "min_bits"),
        (quant_ranges, {"min_bits": 6, "max_bits": 4}, "max_bits"),
        (quant_ranges, {"max_bits": 17}, "max_bits"),
        (quant_ranges, {"signed": "yes"}, "signed"),
        (qparams, {"scale_exponents": (-30, 0)}, "scale_exponents"),
        (qparams, {"scale_exponents": (3, 1)}, "scale_exponents"),
        (qparams, {"quant_range": (5, 5)}, "quant_min"),
        (qparams, {"quant_range": (0, 255), "symmetric": True}, "signed"),
        (qparams, {"channels": 0, "per_channel": True}, "channels"),
        (qparams, {"dtype": torch.float16}, "dtype"),
        (shapes, {"min_dims": 3, "max_dims": 2}, "max_dims"),
        (shapes, {"max_side": 0}, "max_side"),
        (shapes, {"min_side": 4, "min_dims": 3, "max_numel": 10}, "max_numel"),
        (fake_quant_cases, {"dtypes": (torch.int32,)}, "dtypes"),
        (fake_quant_cases, {"ties": "sometimes"}, "ties"),
        (fake_quant_cases, {"dtypes": (torch.bfloat16,), "min_bits": 8}, "bfloat16"),
        (fake_quant_cases, {"dtypes": (torch.float16,), "scale_exponents": (0, 20)}, "overflow"),
        (fake_quant_cases, {"grad_factor": float("nan")}, "grad_factor"),
    ],
)
def test_bad_arguments_raise_invalid_argument(factory, kwargs: dict, match: str) -> None:  # noqa: ANN001
    with pytest.raises(InvalidArgument, match=match):
        factory(**kwargs)


def test_grid_values_check_their_arguments() -> None:
    per_channel = QParams(torch.ones(3), torch.zeros(3), -8, 7, ch_axis=1)
    with pytest.raises(InvalidArgument, match="3 channels"):
        grid_values(QParams(torch.ones(2), torch.zeros(2), -8, 7, ch_axis=1), (4, 3))
    with pytest.raises(InvalidArgument, match="out of range"):
        grid_values(per_channel, (3,))
    with pytest.raises(InvalidArgument, match="draw the strategy first"):
        grid_values(qparams(), (3,))
    with pytest.raises(InvalidArgument, match="one scale"):
        QParams(torch.ones(2), torch.zeros(2), 0, 255)
    with pytest.raises(InvalidArgument, match="quant_min"):
        QParams(torch.ones(1), torch.zeros(1), 3, 3)
    assert grid_values(per_channel, (2, 3)) is not None


def test_import_without_hypothesis_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    monkeypatch.delitem(sys.modules, "pytest_easyquant.strategies")
    with pytest.raises(ImportError, match="pip install hypothesis"):
        importlib.import_module("pytest_easyquant.strategies")
