"""Shapes and values on the quantization grid: small tensor shapes and :func:`grid_values`.

Inputs are drawn in grid units, x = u * s, with u below ``quant_min - z``, inside the range, on
its bounds, on rounding ties (k + 1/2) and above ``quant_max - z``, so the inside of the grid,
both clamped regions and the rounding rule are all exercised.

**Ties.** A value is a rounding tie for every implementation only when the scale is a power of
two: then x / s and x * (1/s) are both exact. For other scales the float nearest (k + 1/2) * s
lands an ulp to one side of the tie or the other depending on how the grid coordinate is
computed: torch's kernels (and the checker's reference) use x * (1/s) in float32, user code
usually x / s. ``ties="exact"`` (the default, also ``True``) places ties only where they are
exact, and keeps every value on other scales well away from a tie, so a correct quantizer
passes whichever way it divides; ``ties="near"`` also puts values at the float nearest a tie for
any scale (use it when your quantizer computes x * (1/s) like torch); ``ties=False`` keeps
every value away from ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from pytest_easyquant.strategies.ranges import QParams
from pytest_easyquant.strategies.validation import TiesOption, _check_int, _invalid, _normalize_ties

_MANTISSA_BITS = {torch.float64: 53, torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}
_OFF_TIE = 7 / 16
"""Away from ties, a value's fraction of a grid step stays within +-7/16 of an integer."""


def _is_power_of_two(value: float) -> bool:
    return value > 0 and math.frexp(value)[0] == 0.5


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
