"""Hypothesis strategies for property-testing fake quantizers.

Draw quantization ranges, qparams, shapes and inputs laid out on the quantization grid, and
whole cases ready for :func:`eqcore.testing.check_fake_quantize`::

    from hypothesis import given
    from pytest_easyquant.strategies import fake_quant_cases

    @given(fake_quant_cases())
    def test_my_fake_quant(case):
        case.check(my_fake_quant)  # fn(x, scale, zero_point, quant_min, quant_max, ch_axis, grad_factor)

Inputs are drawn in grid units, x = u * s, with u below ``quant_min - z``, inside the range, on
its bounds, on rounding ties (k + 1/2) and above ``quant_max - z``, so the inside of the grid,
both clamped regions and the rounding rule are all exercised. Everything is drawn from
hypothesis (no global random state), tensors are small, and a failing case shrinks to a few
values and prints as Python that rebuilds it exactly.

**Ties.** A value is a rounding tie for every implementation only when the scale is a power of
two: then x / s and x * (1/s) are both exact. For other scales the float nearest (k + 1/2) * s
lands an ulp to one side of the tie or the other depending on how the grid coordinate is
computed: torch's kernels (and the checker's reference) use x * (1/s) in float32, user code
usually x / s. ``ties="exact"`` (the default, also ``True``) places ties only where they are
exact, and keeps every value on other scales well away from a tie, so a correct quantizer
passes whichever way it divides; ``ties="near"`` also puts values at the float nearest a tie for
any scale (use it when your quantizer computes x * (1/s) like torch); ``ties=False`` keeps
every value away from ties.

Needs hypothesis (``pip install hypothesis``, or the ``test`` extra of pytest-easyquant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

try:
    from hypothesis import strategies as st
    from hypothesis.errors import InvalidArgument
except ImportError as exc:  # pragma: no cover - exercised by a test that hides hypothesis
    raise ImportError(
        "pytest_easyquant.strategies needs hypothesis: pip install hypothesis "
        "(or pip install 'pytest-easyquant[test]')"
    ) from exc

from eqcore.quant.quantizers import MAX_BITS, check_quant_range
from eqcore.testing import CheckReport, FakeQuantFn, check_fake_quantize

__all__ = [
    "FakeQuantCase",
    "QParams",
    "fake_quant_cases",
    "grid_values",
    "qparams",
    "quant_ranges",
    "shapes",
]

TiesOption = Literal["exact", "near"] | bool

MIN_SCALE_EXPONENT = -23
"""Scales below float32 eps (2**-23) are clamped by torch's kernels and eqcore's reference."""

_MANTISSA_BITS = {torch.float64: 53, torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}
_OFF_TIE = 7 / 16
"""Away from ties, a value's fraction of a grid step stays within +-7/16 of an integer."""


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message)


def _check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise _invalid(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise _invalid(f"{name} must be <= {high}, got {value}")
    return value


def _check_optional_bool(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise _invalid(f"{name} must be True, False or None (either), got {value!r}")
    return value


def _either(draw: Any, value: bool | None) -> bool:
    return draw(st.booleans()) if value is None else value


def _check_quant_range(quant_min: Any, quant_max: Any) -> tuple[int, int]:
    """eqcore's own range check, raised as hypothesis's InvalidArgument."""
    try:
        check_quant_range(quant_min, quant_max)
    except ValueError as exc:
        raise _invalid(str(exc)) from None
    return quant_min, quant_max


def _normalize_ties(ties: Any) -> str | None:
    if ties is True or ties == "exact":
        return "exact"
    if ties == "near":
        return "near"
    if ties is False or ties is None:
        return None
    raise _invalid(f"ties must be 'exact' (or True), 'near' or False, got {ties!r}")


def _is_power_of_two(value: float) -> bool:
    return value > 0 and math.frexp(value)[0] == 0.5


def _tensor_repr(t: torch.Tensor) -> str:
    """Python that rebuilds ``t`` exactly (float32/16 values are exact as Python floats)."""
    dtype = str(t.dtype)
    if t.dim() == 1:
        return f"torch.tensor({t.tolist()!r}, dtype={dtype})"
    return f"torch.tensor({t.reshape(-1).tolist()!r}, dtype={dtype}).reshape({tuple(t.shape)!r})"


# ---------------------------------------------------------------------------------------------
# Quantization ranges.


def quant_ranges(
    *, min_bits: int = 2, max_bits: int = 8, signed: bool | None = None, narrow: bool | None = None
) -> st.SearchStrategy[tuple[int, int]]:
    """``(quant_min, quant_max)`` of a ``min_bits``..``max_bits``-bit integer range.

    ``signed=False``: unsigned, ``0 .. 2**b - 1``. ``signed=True``: ``-2**(b-1) .. 2**(b-1) - 1``,
    or its narrow (symmetric) variant ``-(2**(b-1) - 1) .. 2**(b-1) - 1`` such as -127..127.
    ``None`` (the default) draws either. ``narrow`` picks the signed variant: ``None`` either,
    ``True`` only narrow ranges (2 bits or more), ``False`` only full ones. At most 16 bits.
    """
    _check_int("min_bits", min_bits, 1, MAX_BITS)
    _check_int("max_bits", max_bits, min_bits, MAX_BITS)
    _check_optional_bool("signed", signed)
    _check_optional_bool("narrow", narrow)
    if narrow and signed is False:
        raise _invalid("narrow ranges are signed: narrow=True needs signed=True or None")
    if narrow and max_bits < 2:
        raise _invalid("a narrow range needs at least 2 bits")
    return _quant_ranges(min_bits, max_bits, signed, narrow)


@st.composite
def _quant_ranges(draw: Any, min_bits: int, max_bits: int, signed: bool | None, narrow: bool | None) -> tuple[int, int]:
    if narrow:
        min_bits = max(min_bits, 2)
        signed = True
    bits = draw(st.integers(min_bits, max_bits))
    if not _either(draw, signed):
        return 0, 2**bits - 1
    half = 2 ** (bits - 1)
    if bits >= 2 and _either(draw, narrow):
        return -(half - 1), half - 1
    return -half, half - 1


# ---------------------------------------------------------------------------------------------
# Quantization parameters.


@dataclass(frozen=True)
class QParams:
    """Scale and zero point (1-D tensors, one value per tensor or per channel) and the range.

    ``ch_axis`` is None per tensor (``scale`` and ``zero_point`` have one element) and the channel
    axis per channel (it may be negative; it counts from the input's last dimension then).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    ch_axis: int | None = None

    def __post_init__(self) -> None:
        _check_quant_range(self.quant_min, self.quant_max)
        if self.scale.dim() != 1 or self.scale.shape != self.zero_point.shape:
            raise _invalid(
                f"scale and zero_point must be 1-D tensors of one shape, got {tuple(self.scale.shape)} "
                f"and {tuple(self.zero_point.shape)}"
            )
        if self.ch_axis is None and self.scale.numel() != 1:
            raise _invalid(f"per-tensor qparams need one scale, got {self.scale.numel()}; pass ch_axis")
        if self.ch_axis is not None:
            _check_int("ch_axis", self.ch_axis)

    @property
    def per_channel(self) -> bool:
        return self.ch_axis is not None

    @property
    def channels(self) -> int:
        """Number of (scale, zero point) pairs: 1 per tensor."""
        return self.scale.numel()

    def effective_zero_point(self) -> list[int]:
        """The zero points as a quantizer uses them: rounded half to even, clamped to the range."""
        z = torch.round(self.zero_point.double()).clamp(self.quant_min, self.quant_max)
        return [int(v) for v in z.tolist()]

    def __repr__(self) -> str:
        return (
            f"QParams(scale={_tensor_repr(self.scale)}, zero_point={_tensor_repr(self.zero_point)}, "
            f"quant_min={self.quant_min}, quant_max={self.quant_max}, ch_axis={self.ch_axis})"
        )


def _check_scale_exponents(scale_exponents: Any) -> tuple[int, int]:
    if not (isinstance(scale_exponents, Sequence) and len(scale_exponents) == 2):
        raise _invalid(f"scale_exponents must be a (low, high) pair of ints, got {scale_exponents!r}")
    low = _check_int("scale_exponents[0]", scale_exponents[0], MIN_SCALE_EXPONENT, 64)
    high = _check_int("scale_exponents[1]", scale_exponents[1], low, 64)
    return low, high


def _int_or_strategy(name: str, value: Any, low: int) -> st.SearchStrategy[int]:
    if isinstance(value, st.SearchStrategy):
        return value
    return st.just(_check_int(name, value, low))


def qparams(
    *,
    per_channel: bool | None = False,
    channels: int | st.SearchStrategy[int] | None = None,
    ch_axis: int = 0,
    symmetric: bool | None = None,
    quant_range: tuple[int, int] | st.SearchStrategy[tuple[int, int]] | None = None,
    scale_exponents: tuple[int, int] = (-8, 4),
    power_of_two: bool | None = False,
    integer_zero_point: bool = True,
    dtype: torch.dtype = torch.float32,
) -> st.SearchStrategy[QParams]:
    """Quantization parameters: a :class:`QParams`.

    - ``per_channel``: one scale and zero point per tensor (False), per channel along ``ch_axis``
      (True) or either (None). ``channels``: how many (an int or a strategy; default 1..4).
    - ``symmetric``: True gives zero points of 0 on a signed range; None draws either.
    - ``quant_range``: a ``(quant_min, quant_max)`` pair or a strategy of them; default
      :func:`quant_ranges` (signed when symmetric).
    - Scales lie in ``[2**low, 2**high]`` for ``scale_exponents=(low, high)`` and are float32
      values. ``power_of_two=True`` draws only powers of two (every product with them is exact),
      False any float (which may occasionally be a power of two), None either per channel.
    - Zero points are integers in the range; ``integer_zero_point=False`` also draws them off the
      integers (k + 1/4, k + 1/2, k + 3/4), as a learned zero point is: a quantizer must round it
      half to even, like torch.
    - ``dtype``: the tensors' dtype (float32 like torch's modules' parameters, or float64).
    """
    _check_optional_bool("per_channel", per_channel)
    _check_optional_bool("symmetric", symmetric)
    _check_optional_bool("power_of_two", power_of_two)
    if not isinstance(integer_zero_point, bool):
        raise _invalid(f"integer_zero_point must be a bool, got {integer_zero_point!r}")
    _check_int("ch_axis", ch_axis)
    low, high = _check_scale_exponents(scale_exponents)
    if dtype not in (torch.float32, torch.float64):
        raise _invalid(f"qparams dtype must be torch.float32 or torch.float64, got {dtype}")
    channel_counts = st.integers(1, 4) if channels is None else _int_or_strategy("channels", channels, 1)
    if quant_range is None:
        ranges = None
    elif isinstance(quant_range, st.SearchStrategy):
        ranges = quant_range
    else:
        if not (isinstance(quant_range, Sequence) and len(quant_range) == 2):
            raise _invalid(f"quant_range must be a (quant_min, quant_max) pair, got {quant_range!r}")
        fixed = _check_quant_range(*quant_range)
        if symmetric and fixed[0] >= 0:
            raise _invalid(f"symmetric qparams need a signed range (zero point 0 inside it), got {fixed}")
        ranges = st.just(fixed)
    return _qparams(per_channel, channel_counts, ch_axis, symmetric, ranges, low, high, power_of_two, integer_zero_point, dtype)


@st.composite
def _scale_values(draw: Any, low: int, high: int, power_of_two: bool | None) -> float:
    if _either(draw, power_of_two):
        return 2.0 ** draw(st.integers(low, high))
    return draw(st.floats(2.0**low, 2.0**high, width=32))


@st.composite
def _zero_points(draw: Any, quant_min: int, quant_max: int, integer: bool) -> float:
    k = draw(st.integers(quant_min, quant_max))
    if integer or k == quant_max or not draw(st.booleans()):
        return float(k)
    return k + draw(st.sampled_from([0.5, 0.25, 0.75]))


@st.composite
def _qparams(
    draw: Any,
    per_channel: bool | None,
    channel_counts: st.SearchStrategy[int],
    ch_axis: int,
    symmetric: bool | None,
    ranges: st.SearchStrategy[tuple[int, int]] | None,
    low: int,
    high: int,
    power_of_two: bool | None,
    integer_zero_point: bool,
    dtype: torch.dtype,
) -> QParams:
    per_channel = _either(draw, per_channel)
    count = draw(channel_counts) if per_channel else 1
    if ranges is None:
        sym = _either(draw, symmetric)
        quant_min, quant_max = draw(quant_ranges(signed=True if sym else None))
    else:
        quant_min, quant_max = _check_quant_range(*draw(ranges))
        # A drawn unsigned range cannot be symmetric (symmetric=None) or is a bad strategy (True).
        if symmetric and quant_min >= 0:
            raise _invalid(f"symmetric qparams need signed ranges, the quant_range strategy gave {(quant_min, quant_max)}")
        sym = draw(st.booleans()) if symmetric is None and quant_min < 0 else bool(symmetric)
    scales = [draw(_scale_values(low, high, power_of_two)) for _ in range(count)]
    if sym:
        zero_points = [0.0] * count
    else:
        zero_points = [draw(_zero_points(quant_min, quant_max, integer_zero_point)) for _ in range(count)]
    return QParams(
        scale=torch.tensor(scales, dtype=dtype),
        zero_point=torch.tensor(zero_points, dtype=dtype),
        quant_min=quant_min,
        quant_max=quant_max,
        ch_axis=ch_axis if per_channel else None,
    )


# ---------------------------------------------------------------------------------------------
# Shapes.


def shapes(
    *, min_dims: int = 1, max_dims: int = 4, min_side: int = 1, max_side: int = 6, max_numel: int = 48
) -> st.SearchStrategy[tuple[int, ...]]:
    """Tensor shapes with ``min_dims..max_dims`` dimensions of ``min_side..max_side`` each and at
    most ``max_numel`` elements (small, so every element can be drawn and shrunk)."""
    _check_int("min_dims", min_dims, 0, 8)
    _check_int("max_dims", max_dims, min_dims, 8)
    _check_int("min_side", min_side, 0)
    _check_int("max_side", max_side, max(min_side, 1))
    _check_int("max_numel", max_numel, max(min_side, 1) ** min_dims)
    return _shapes(min_dims, max_dims, min_side, max_side, max_numel)


@st.composite
def _shapes(draw: Any, min_dims: int, max_dims: int, min_side: int, max_side: int, max_numel: int) -> tuple[int, ...]:
    ndim = draw(st.integers(min_dims, max_dims))
    # Sides are drawn in a random order of the dimensions within the element budget, so no
    # dimension is always the one squeezed by it.
    order = draw(st.permutations(range(ndim))) if ndim > 1 else list(range(ndim))
    sides = [0] * ndim
    product, floor = 1, max(min_side, 1)
    for index, dim in enumerate(order):
        reserve = floor ** (ndim - index - 1)
        largest = min(max_side, max_numel // (max(product, 1) * reserve))
        sides[dim] = draw(st.integers(min_side, max(min_side, largest)))
        product *= sides[dim]
    return tuple(sides)


# ---------------------------------------------------------------------------------------------
# Values on the grid.


@dataclass(frozen=True)
class _ChannelPlan:
    """What one channel's values may be: u = x / s in grid units relative to its zero point."""

    low: int  # quant_min - z: the lowest grid point, in steps
    high: int  # quant_max - z
    exact: bool  # every x / s is exact (power-of-two scale), or near ties are allowed
    ties: bool
    margin: int

    def kinds(self) -> list[str]:
        kinds = ["grid", "inside", "edge"]
        if self.ties:
            kinds.append("tie")
        if self.margin:
            kinds += ["below", "above"]
        return kinds

    def anchors(self) -> list[str]:
        """Kinds that cover every region, placed first in a channel when the draw asks for it."""
        first = ["below", "above"] if self.margin else []
        return first + ["edge"] + (["tie"] if self.ties else []) + ["inside"]

    def values(self, kind: str) -> st.SearchStrategy[float]:
        fraction = (
            st.floats(-0.5, 0.5, exclude_min=True, exclude_max=True)
            if self.exact
            else st.floats(-_OFF_TIE, _OFF_TIE)
        )

        def steps(low: int, high: int) -> st.SearchStrategy[float]:
            return st.tuples(st.integers(low, high), fraction).map(lambda kf: kf[0] + kf[1])

        if kind == "grid":
            return st.integers(self.low, self.high).map(float)
        if kind == "edge":
            return st.sampled_from([float(self.low), float(self.high)])
        if kind == "tie":
            return st.integers(self.low - 1, self.high).map(lambda k: k + 0.5)
        if kind == "below":
            return steps(self.low - self.margin, self.low - 1)
        if kind == "above":
            return steps(self.high + 1, self.high + self.margin)
        return steps(self.low, self.high)


def _channel_view(t: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    shape = [1] * ndim
    if axis is not None:
        shape[axis] = -1
    return t.reshape(shape)


def grid_values(
    qparams: QParams,
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    margin: int = 3,
    ties: TiesOption = True,
) -> st.SearchStrategy[torch.Tensor]:
    """A tensor of ``shape`` and ``dtype`` with values x = u * s on ``qparams``' grid.

    u (grid units, each element in its own channel's units) is drawn below the range
    (``quant_min - z - margin .. quant_min - z - 1``, clamped to quant_min), inside it (on grid
    points, on its two bounds and between grid points) and above it, up to ``margin`` steps out;
    ``ties`` adds rounding ties u = k + 1/2, the two just outside the bounds included (see the
    module docstring for "exact" and "near"). About half the examples start each channel with
    one value of every kind (below, above, a bound, a tie, inside) so that a single example
    covers them all; the rest are drawn freely and shrink towards zeros.

    ``qparams`` is a concrete :class:`QParams`, not a strategy (draw it first, e.g. with
    ``st.data()`` or in an ``@st.composite``); per channel, ``shape[qparams.ch_axis]`` must be
    the number of channels. Low-precision dtypes hold fewer grid points exactly: bfloat16 stores
    integers up to 2**8 and float16 up to 2**11, so keep ranges narrower there.
    """
    if not isinstance(qparams, QParams):
        hint = " (draw the strategy first)" if isinstance(qparams, st.SearchStrategy) else ""
        raise _invalid(f"grid_values needs a QParams value{hint}, got {type(qparams).__name__}")
    if not (isinstance(shape, Sequence) or isinstance(shape, torch.Size)):
        raise _invalid(f"shape must be a sequence of ints, got {shape!r}")
    shape = tuple(_check_int("shape entries", side, 0) for side in shape)
    if dtype not in _MANTISSA_BITS:
        raise _invalid(f"dtype must be a floating-point dtype, got {dtype}")
    _check_int("margin", margin, 0)
    mode = _normalize_ties(ties)
    axis = None
    if qparams.per_channel:
        if not -len(shape) <= qparams.ch_axis < len(shape):
            raise _invalid(f"ch_axis {qparams.ch_axis} is out of range for shape {shape}")
        axis = qparams.ch_axis % len(shape)
        if shape[axis] != qparams.channels:
            raise _invalid(
                f"shape {shape} has {shape[axis]} channels along ch_axis {qparams.ch_axis}, "
                f"qparams have {qparams.channels}"
            )
    plans = []
    for s, z in zip(qparams.scale.tolist(), qparams.effective_zero_point()):
        exact = mode == "near" or (mode == "exact" and _is_power_of_two(s))
        plans.append(_ChannelPlan(qparams.quant_min - z, qparams.quant_max - z, exact, exact and mode is not None, margin))
    return _grid_values(qparams, shape, axis, dtype, plans)


def _near_tie(u: torch.Tensor) -> torch.Tensor:
    """Where u (float64) is close enough to k + 1/2 for float32's x * (1/s) and x / s to round
    it differently: within a few float32 ulps of |u| (and 1/1024 of a step)."""
    distance = (u - torch.floor(u) - 0.5).abs()
    return distance < 2.0**-10 + u.abs() * 2.0**-18


@st.composite
def _grid_values(
    draw: Any, qparams: QParams, shape: tuple[int, ...], axis: int | None, dtype: torch.dtype, plans: list[_ChannelPlan]
) -> torch.Tensor:
    kind_choices = [st.sampled_from(plan.kinds()) for plan in plans]
    value_choices = [{kind: plan.values(kind) for kind in plan.kinds()} for plan in plans]
    numel = math.prod(shape)
    if axis is None:
        channel_of = [0] * numel
    else:
        index = torch.arange(shape[axis]).reshape([-1 if d == axis else 1 for d in range(len(shape))])
        channel_of = index.expand(shape).reshape(-1).tolist()
    anchored = numel > 0 and draw(st.booleans())
    placed = [0] * len(plans)
    anchors = [plan.anchors() for plan in plans]
    units = []
    for channel in channel_of:
        count = placed[channel]
        placed[channel] += 1
        if anchored and count < len(anchors[channel]):
            kind = anchors[channel][count]
        else:
            kind = draw(kind_choices[channel])
        units.append(draw(value_choices[channel][kind]))
    s = _channel_view(qparams.scale.double(), len(shape), axis)
    x = (torch.tensor(units, dtype=torch.float64).reshape(shape) * s).to(dtype)
    # Rounding x to the dtype moves u by up to an ulp of x: where that lands a value of a channel
    # without exact ties near one, snap it to the nearest grid point.
    inexact = torch.tensor([not plan.exact for plan in plans])[torch.tensor(channel_of, dtype=torch.long)].reshape(shape)
    if bool(inexact.any()):
        u = x.double() / s
        snap = inexact & _near_tie(u)
        if bool(snap.any()):
            x = torch.where(snap, (torch.round(u) * s).to(dtype), x)
    return x


# ---------------------------------------------------------------------------------------------
# Whole cases.


@dataclass(frozen=True)
class FakeQuantCase:
    """One fake-quantization input for :func:`eqcore.testing.check_fake_quantize`.

    ``check_fake_quantize(fn, **case.kwargs())`` or ``case.check(fn)``. ``ch_axis`` may be
    negative; the checker hands ``fn`` the axis normalised to ``0..x.dim() - 1``.
    """

    x: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    ch_axis: int | None
    grad_factor: float

    @property
    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero_point, self.quant_min, self.quant_max, self.ch_axis)

    def kwargs(self) -> dict[str, Any]:
        """The checker's arguments: ``x, scale, zero_point, quant_min, quant_max, ch_axis, grad_factor``."""
        return {
            "x": self.x,
            "scale": self.scale,
            "zero_point": self.zero_point,
            "quant_min": self.quant_min,
            "quant_max": self.quant_max,
            "ch_axis": self.ch_axis,
            "grad_factor": self.grad_factor,
        }

    def check(self, fn: FakeQuantFn, **options: Any) -> CheckReport:
        """``check_fake_quantize(fn, **self.kwargs(), **options)``: raises AssertionError naming
        every failed property, unless ``raise_on_failure=False`` (then read the report)."""
        return check_fake_quantize(fn, **self.kwargs(), **options)

    def __repr__(self) -> str:
        return (
            f"FakeQuantCase(x={_tensor_repr(self.x)}, scale={_tensor_repr(self.scale)}, "
            f"zero_point={_tensor_repr(self.zero_point)}, quant_min={self.quant_min}, "
            f"quant_max={self.quant_max}, ch_axis={self.ch_axis}, grad_factor={self.grad_factor!r})"
        )


def _max_exact_bits(dtype: torch.dtype, margin: int) -> int:
    """Widest range whose grid points and ties (2u, up to 2 * (2**bits + margin)) the dtype holds."""
    bits = MAX_BITS
    while bits > 1 and 2 * (2**bits + margin + 1) > 2 ** _MANTISSA_BITS[dtype]:
        bits -= 1
    return bits


def fake_quant_cases(
    *,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    per_channel: bool | None = None,
    symmetric: bool | None = None,
    quant_range: tuple[int, int] | st.SearchStrategy[tuple[int, int]] | None = None,
    min_bits: int = 2,
    max_bits: int = 8,
    signed: bool | None = None,
    scale_exponents: tuple[int, int] = (-8, 4),
    power_of_two: bool | None = None,
    integer_zero_point: bool = True,
    min_dims: int = 1,
    max_dims: int = 4,
    max_side: int = 6,
    max_numel: int = 48,
    margin: int = 3,
    ties: TiesOption = True,
    grad_factor: float | st.SearchStrategy[float] | None = None,
) -> st.SearchStrategy[FakeQuantCase]:
    """Whole fake-quantization cases: a :class:`FakeQuantCase`.

    Draws a dtype from ``dtypes``, per tensor or per channel (``per_channel``; the channel axis
    is any axis of the drawn shape, negative ones included), a shape (:func:`shapes` with
    ``min_dims``, ``max_dims``, ``max_side``, ``max_numel``), qparams (:func:`qparams` with
    ``symmetric``, ``quant_range`` or a range of ``min_bits..max_bits`` bits, ``signed``,
    ``scale_exponents``, ``power_of_two`` (default: either, per channel), ``integer_zero_point``),
    the input (:func:`grid_values` with ``margin`` and ``ties``) and a grad factor: 1, 0.5, or
    LSQ's 1/sqrt(numel * quant_max), unless ``grad_factor`` gives one or a strategy.

    Bit widths are capped per dtype so the grid and its ties stay exact in it (float16: 9 bits,
    bfloat16: 6 with the default margin), and scales must keep the input finite.
    """
    dtypes = tuple(dtypes)
    if not dtypes or any(d not in _MANTISSA_BITS for d in dtypes):
        raise _invalid(f"dtypes must be floating-point dtypes, got {dtypes!r}")
    _check_optional_bool("per_channel", per_channel)
    _check_int("min_bits", min_bits, 1, MAX_BITS)
    _check_int("max_bits", max_bits, min_bits, MAX_BITS)
    _check_int("margin", margin, 0)
    _normalize_ties(ties)
    low, high = _check_scale_exponents(scale_exponents)
    if per_channel and max_dims < 1:
        raise _invalid("per-channel cases need max_dims >= 1")
    shapes(min_dims=min_dims, max_dims=max_dims, max_side=max_side, max_numel=max_numel)  # validates
    if quant_range is not None and not isinstance(quant_range, st.SearchStrategy):
        qparams(quant_range=quant_range, symmetric=symmetric)  # validates
    bits_for = {}
    for dtype in dtypes:
        bits_for[dtype] = min(max_bits, _max_exact_bits(dtype, margin))
        if quant_range is None and bits_for[dtype] < min_bits:
            raise _invalid(f"{dtype} holds at most a {bits_for[dtype]}-bit grid exactly; min_bits is {min_bits}")
        widest = 2.0**high * (2 ** (bits_for[dtype] if quant_range is None else MAX_BITS) + margin + 1)
        if quant_range is None and widest >= torch.finfo(dtype).max:
            raise _invalid(f"scale_exponents {scale_exponents} overflow {dtype} on a {bits_for[dtype]}-bit grid")
    if grad_factor is None:
        factors = None
    elif isinstance(grad_factor, st.SearchStrategy):
        factors = grad_factor
    elif isinstance(grad_factor, (int, float)) and not isinstance(grad_factor, bool) and math.isfinite(grad_factor):
        factors = st.just(float(grad_factor))
    else:
        raise _invalid(f"grad_factor must be a finite number, a strategy or None, got {grad_factor!r}")
    options = dict(
        symmetric=symmetric, scale_exponents=(low, high), power_of_two=power_of_two,
        integer_zero_point=integer_zero_point,
    )
    return _fake_quant_cases(
        dtypes, per_channel, quant_range, bits_for, min_bits, signed, options,
        (min_dims, max_dims, max_side, max_numel), margin, ties, factors,
    )


@st.composite
def _fake_quant_cases(
    draw: Any,
    dtypes: tuple[torch.dtype, ...],
    per_channel: bool | None,
    quant_range: Any,
    bits_for: dict[torch.dtype, int],
    min_bits: int,
    signed: bool | None,
    options: dict[str, Any],
    shape_options: tuple[int, int, int, int],
    margin: int,
    ties: TiesOption,
    factors: st.SearchStrategy[float] | None,
) -> FakeQuantCase:
    dtype = draw(st.sampled_from(dtypes))
    min_dims, max_dims, max_side, max_numel = shape_options
    per_channel = _either(draw, per_channel) and max_dims >= 1
    shape = draw(shapes(min_dims=max(min_dims, 1) if per_channel else min_dims, max_dims=max_dims, max_side=max_side, max_numel=max_numel))
    ch_axis = draw(st.integers(-len(shape), len(shape) - 1)) if per_channel else 0
    if quant_range is None:
        symmetric = options["symmetric"]
        quant_range = quant_ranges(min_bits=min_bits, max_bits=bits_for[dtype], signed=True if symmetric else signed)
    params = draw(
        qparams(
            per_channel=per_channel,
            channels=shape[ch_axis] if per_channel else None,
            ch_axis=ch_axis,
            quant_range=quant_range,
            **options,
        )
    )
    x = draw(grid_values(params, shape, dtype=dtype, margin=margin, ties=ties))
    if factors is None:
        lsq = 1.0 / math.sqrt(max(x.numel(), 1) * max(params.quant_max, 1))
        grad_factor = draw(st.sampled_from([1.0, 0.5, lsq]))
    else:
        grad_factor = float(draw(factors))
    return FakeQuantCase(
        x=x,
        scale=params.scale,
        zero_point=params.zero_point,
        quant_min=params.quant_min,
        quant_max=params.quant_max,
        ch_axis=params.ch_axis,
        grad_factor=grad_factor,
    )
