"""Quantization ranges and parameters: ``(quant_min, quant_max)`` pairs and :class:`QParams`.

Ranges are unsigned, signed or narrow (symmetric) signed integer ranges of a few bits; qparams
are per-tensor or per-channel scales (float32 values, optionally powers of two) and zero points
in the range (integers, or learned ones off the integers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from eqcore.quant.functional import MAX_BITS, check_quant_range
from pytest_easyquant.strategies.validation import (
    _check_int,
    _check_optional_bool,
    _check_scale_exponents,
    _either,
    _invalid,
)


def _check_quant_range(quant_min: Any, quant_max: Any) -> tuple[int, int]:
    """eqcore's own range check, raised as hypothesis's InvalidArgument."""
    try:
        check_quant_range(quant_min, quant_max)
    except ValueError as exc:
        raise _invalid(str(exc)) from None
    return quant_min, quant_max


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
