"""Hypothesis strategies for fake-quantization cases, drawn in grid units.

Values are drawn as u (grid units, x = u * s) spanning from below ``qmin - z`` to above
``qmax - z``, as integers (on the grid), half-integers (rounding ties) and arbitrary floats, so
every case hits the inside and both clamped regions. Bit widths are capped per dtype so that a
grid value (k - z) * s stays exactly recoverable in that dtype (idempotence needs it):
float16 has 11 significant bits, bfloat16 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from pytest_easyquant.strategies import FakeQuantCase

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_BITS = {torch.float32: 16, torch.float64: 16, torch.float16: 10, torch.bfloat16: 7}
# log2 of the scale range per dtype, keeping |x| far from overflow and out of subnormals.
SCALE_EXPONENTS = {
    torch.float32: (-10, 6),
    torch.float64: (-10, 6),
    torch.float16: (-6, 4),
    torch.bfloat16: (-10, 6),
}


@dataclass(frozen=True)
class FQCase(FakeQuantCase):
    """The public :class:`FakeQuantCase` (qparams as float32 tensors, like module params) with
    the tests' helpers; the tests pass their own grad_factor to the function under test."""

    grad_factor: float = 1.0

    @property
    def axis(self) -> int | None:
        """The channel axis normalised to [0, ndim)."""
        return None if self.ch_axis is None else self.ch_axis % self.x.dim()

    def channel_shape(self) -> list[int]:
        shape = [1] * self.x.dim()
        if self.axis is not None:
            shape[self.axis] = -1
        return shape

    def s64(self) -> torch.Tensor:
        """Scale in float64, shaped to broadcast over x."""
        return self.scale.double().reshape(self.channel_shape())

    def z64(self) -> torch.Tensor:
        """Zero point rounded half to even and clamped, float64, shaped to broadcast over x."""
        z = torch.round(self.zero_point.double()).clamp(self.quant_min, self.quant_max)
        return z.reshape(self.channel_shape())


@st.composite
def quant_ranges(draw, max_bits: int = 16, symmetric: bool | None = None) -> tuple[int, int]:
    """(qmin, qmax) of a 2..max_bits-bit range: unsigned, signed, or signed narrow (-2^(b-1)+1)."""
    bits = draw(st.integers(2, max_bits))
    kind = draw(st.sampled_from(["unsigned", "signed", "narrow"] if not symmetric else ["signed", "narrow"]))
    if kind == "unsigned":
        return 0, 2**bits - 1
    if kind == "signed":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1


@st.composite
def scales(draw, dtype: torch.dtype = torch.float32, power_of_two: bool | None = None) -> float:
    """A float32-representable scale: a power of two or an arbitrary value in the dtype's range."""
    lo, hi = SCALE_EXPONENTS[dtype]
    if power_of_two is None:
        power_of_two = draw(st.booleans())
    if power_of_two:
        return 2.0 ** draw(st.integers(lo, hi))
    return draw(st.floats(2.0**lo, 2.0**hi, width=32))


@st.composite
def zero_points(draw, quant_min: int, quant_max: int, *, symmetric: bool = False, integer: bool = False) -> float:
    """0 for symmetric; otherwise an integer in range, or (not ``integer``) a fractional value."""
    if symmetric:
        return 0.0
    z = draw(st.integers(quant_min, quant_max))
    if integer or not draw(st.booleans()):
        return float(z)
    return float(draw(st.sampled_from([z - 0.5, z + 0.5, z + 0.25, z - 0.3])))


def _off_tie(u: float) -> float:
    """Move u a quarter step away from a rounding tie (used where ties must be avoided)."""
    return u + 0.25 if abs(u - math.floor(u) - 0.5) < 0.05 else u


def grid_units(low: float, high: float, margin: float = 0.0, *, ties: bool = True) -> st.SearchStrategy[float]:
    """Grid coordinates u in [low, high]: integers, half-integer ties and arbitrary floats, plus
    values in the outer ``margin`` on either side (the clamped regions) drawn explicitly."""
    ints = st.integers(math.ceil(low), math.floor(high))
    floats = st.floats(low, high, allow_nan=False, allow_infinity=False)
    outside = st.floats(low, low + margin) | st.floats(high - margin, high) if margin else st.nothing()
    if not ties:
        return st.one_of(ints.map(float), floats.map(_off_tie), outside.map(_off_tie))
    return st.one_of(
        ints.map(float),
        st.integers(math.ceil(low), math.floor(high) - 1).map(lambda k: k + 0.5),
        floats,
        outside,
    )


def grid_span(quant_min: int, quant_max: int, z: float) -> tuple[float, float, float]:
    """(low, high, margin): u from below qmin - z to above qmax - z, by a few steps or 10% of the range."""
    margin = max(3.0, 0.1 * (quant_max - quant_min))
    zr = min(max(round(z), quant_min), quant_max)
    return quant_min - zr - margin, quant_max - zr + margin, margin - 0.5


def to_x(u: list[float], scale: torch.Tensor, shape: list[int], axis: int | None, dtype: torch.dtype) -> torch.Tensor:
    """x = u * s (per channel along ``axis``), computed in float64 and cast to ``dtype``."""
    u64 = torch.tensor(u, dtype=torch.float64).reshape(shape)
    s = scale.double()
    if axis is not None:
        view = [1] * len(shape)
        view[axis] = -1
        s = s.reshape(view)
    return (u64 * s).to(dtype)


@st.composite
def shapes_and_axes(draw, max_ndim: int = 4, max_side: int = 3) -> tuple[list[int], int]:
    """A non-empty shape and a channel axis in [-ndim, ndim)."""
    ndim = draw(st.integers(1, max_ndim))
    shape = draw(st.lists(st.integers(1, max_side), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    return shape, axis


@st.composite
def fq_cases(
    draw,
    *,
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    per_channel: bool | None = None,
    symmetric: bool | None = None,
    integer_zero_point: bool = False,
    power_of_two: bool | None = None,
    min_size: int = 1,
    max_size: int = 24,
    max_bits: int = 16,
    ties: bool = True,
    nonnegative_zero_point: bool = False,
) -> FQCase:
    """A whole case: dtype, range, qparams, and x spanning the grid and both clamped regions."""
    dtype = draw(st.sampled_from(dtypes))
    sym = draw(st.booleans()) if symmetric is None else symmetric
    qmin, qmax = draw(quant_ranges(min(max_bits, MAX_BITS[dtype]), symmetric=sym))
    if per_channel is None:
        per_channel = draw(st.booleans())
    if per_channel:
        shape, ch_axis = draw(shapes_and_axes())
        channels = shape[ch_axis]
    else:
        size = draw(st.integers(min_size, max_size))
        shape, ch_axis, channels = [size], None, 1
    scale_list = [draw(scales(dtype, power_of_two)) for _ in range(channels)]
    zp_list = [draw(zero_points(qmin, qmax, symmetric=sym, integer=integer_zero_point)) for _ in range(channels)]
    if nonnegative_zero_point:
        zp_list = [abs(z) if -z <= qmax else 0.0 for z in zp_list]
    axis = None if ch_axis is None else ch_axis % len(shape)
    if axis is None:
        channel_of = torch.zeros(shape, dtype=torch.long)
    else:
        channel_of = torch.arange(shape[axis]).reshape([-1 if d == axis else 1 for d in range(len(shape))]).expand(shape)
    # Each element's u spans its own channel's grid (and both clamped regions around it).
    spans = [grid_units(*grid_span(qmin, qmax, z), ties=ties) for z in zp_list]
    u = [draw(spans[c]) for c in channel_of.reshape(-1).tolist()]
    scale = torch.tensor(scale_list, dtype=torch.float32)
    zero_point = torch.tensor(zp_list, dtype=torch.float32)
    x = to_x(u, scale, shape, axis, dtype)
    return FQCase(x, scale, zero_point, qmin, qmax, ch_axis)
