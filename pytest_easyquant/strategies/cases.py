"""Whole fake-quantization cases: a dtype, a shape, qparams, the input and a grad factor.

:func:`fake_quant_cases` draws a :class:`FakeQuantCase` from the other strategies, with bit
widths capped so that each dtype holds the grid and its ties exactly; ``case.check(fn)`` runs
:func:`eqcore.testing.check_fake_quantize` on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from eqcore.quant.functional import MAX_BITS
from eqcore.testing import CheckReport, FakeQuantFn, check_fake_quantize
from pytest_easyquant.strategies.grids import _MANTISSA_BITS, grid_values, shapes
from pytest_easyquant.strategies.ranges import QParams, _tensor_repr, qparams, quant_ranges
from pytest_easyquant.strategies.validation import (
    TiesOption,
    _check_int,
    _check_optional_bool,
    _check_scale_exponents,
    _either,
    _invalid,
    _normalize_ties,
)


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
    ch_axis = _channel_axis(draw, len(shape)) if per_channel else 0
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


def _channel_axis(draw: st.DrawFn, ndim: int) -> int:
    """Any axis of an ``ndim``-d shape, negative half the time: the sign and the position are
    drawn apart, so every negative axis (-ndim included) is as easy to reach as its positive one."""
    axis = draw(st.integers(0, ndim - 1))
    return axis - ndim if draw(st.booleans()) else axis
