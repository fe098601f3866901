"""Fake quantization's functional API: range checks, qparams and the exact autograd functions.

Numerics (DESIGN.md section 4), with u = x * (1/s) as torch's kernels compute it:

    q = round_half_even(u) + z,    y = (clamp(q, qmin, qmax) - z) * s
    dX = dY where qmin <= q <= qmax, else 0
    dS = g * dY * (y/s - x/s)  inside,  g * dY * (qmin - z) below,  g * dY * (qmax - z) above
    dZ = 0 inside,  -g * dY * s outside

The zero point is rounded half to even and clamped to [qmin, qmax] identically in forward and
backward; the scale is clamped to float32 eps. Policies where torch's kernels disagree with
themselves: +inf clamps to qmax and -inf to qmin like any out-of-range value; NaN propagates: it
stays NaN in y, gets dX = 0, and makes dS and dZ NaN (of its channel, per channel), so a broken
activation cannot silently steer the learned qparams; empty inputs give dS = dZ = 0; any channel axis, negative ones included, and
1-D per-channel inputs work; float16/bfloat16 inputs are computed in float32 and float64 inputs
in float64 (torch rounds the float64 product scale*q to float32; we do not).

``learnable_fake_quantize`` and ``fake_quantize`` check their arguments and apply the autograd
functions, whose forward and backward run the chunked kernels of ``eqcore.quant.kernels``;
``observe_backward`` lets an observer (the SA hooks) see a backward's chunks. Under
torch.compile they apply the whole-tensor functions of ``eqcore.quant.fused`` instead (same
numerics), which inductor fuses.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from eqcore.quant.fused import (
    EPS,  # noqa: F401 - re-exported: quant.modules and the tests import it from here
    FusedFakeQuantizeFn,
    FusedLearnableFakeQuantizeFn,
    Sum,
    combine_grid_sums,
    compiling,
    param_grad,
)
from eqcore.quant.fused import qparams as _qparams
from eqcore.quant.kernels import (
    _backward,
    _backward_from_factor,
    _fake_quantize_keeping_factor,
    _fake_quantize_values,
    _host_zero_point,
    _keeps_factor,
)

MAX_BITS = 16


def check_quant_range(quant_min: int, quant_max: int) -> None:
    """Raise ValueError unless [quant_min, quant_max] is a valid 1..16-bit integer range."""
    for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if quant_min >= quant_max:
        raise ValueError(
            f"quant_min ({quant_min}) must be less than quant_max ({quant_max})"
        )
    if quant_max - quant_min + 1 > 2**MAX_BITS:
        raise ValueError(
            f"quant_min..quant_max ({quant_min}..{quant_max}) spans more than {MAX_BITS} bits; "
            f"use a range of at most {2**MAX_BITS} levels"
        )


def normalize_axis(axis: int, ndim: int) -> int:
    """Channel axis in [0, ndim), accepting negative axes; ValueError when out of range."""
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"ch_axis {axis} is out of range for a {ndim}-d input (valid: {-ndim}..{ndim - 1})"
        )
    return axis % ndim


def grad_scaling_factor(numel: int, quant_max: int) -> float:
    """LSQ's gradient scale 1/sqrt(numel * qmax), as torch's modules compute it (numel >= 1)."""
    return 1.0 / math.sqrt(max(numel, 1) * max(quant_max, 1))


def observe_backward(output: torch.Tensor, observer: Any) -> bool:
    """Let ``observer`` see the backward of the eqcore fake quantization that made ``output``.

    The backward calls ``observer.begin(dY, 1/s, chunk_size)``, with 1/s None where it offers
    no chunks (per channel, or not on the CPU). When ``begin`` returns a callable, the backward
    calls it with each chunk's flat u = x * (1/s), round(u), dY and x (which it must not modify:
    the backward goes on with them) and a free scratch of as many elements, in order, then
    ``observer.end()``, or ``observer.abort()`` if a chunk holds NaN or inf, after which the
    observer works from dY alone. False when ``output`` does not come from eqcore's fake
    quantization.
    """
    node = output.grad_fn
    if not isinstance(node, (_LearnableFakeQuantizeFn._backward_cls, _FakeQuantizeFn._backward_cls)):
        return False
    node.chunk_observer = observer
    return True


class _LearnableFakeQuantizeFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        quant_min: int,
        quant_max: int,
        axis: int | None,
        grad_factor: float,
        grad_enabled: bool,
    ) -> torch.Tensor:
        s, z = _qparams(x, scale, zero_point, quant_min, quant_max, axis)
        ctx.qrange = (quant_min, quant_max)
        ctx.axis = axis
        ctx.grad_factor = grad_factor
        ctx.z_host = _host_zero_point(z)
        ctx.param_meta = ((scale.shape, scale.dtype), (zero_point.shape, zero_point.dtype))
        ctx.save_for_backward(x, s, z)
        ctx.factor = None
        if grad_enabled and scale.requires_grad and _keeps_factor(x, axis, ctx.z_host, quant_min, quant_max):
            # Not a saved tensor: the backward writes dX over it, and lets go of it.
            y, ctx.factor = _fake_quantize_keeping_factor(x, s, quant_min, quant_max, axis, ctx.z_host)
            return y
        return _fake_quantize_values(x, s, z, quant_min, quant_max, axis, ctx.z_host)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, s, z = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        axis, g = ctx.axis, ctx.grad_factor
        need_x, need_s, need_z = ctx.needs_input_grad[:3]
        observer = getattr(ctx, "chunk_observer", None)
        grad_dtype, grad_y = grad_y.dtype, grad_y.to(s.dtype)
        result = None
        factor, ctx.factor = ctx.factor, None  # dX overwrites it: a retained graph's next backward recomputes
        if factor is not None and observer is None:
            result = _backward_from_factor(factor, grad_y, axis, need_z)
        if result is None:
            result = _recomputed_sums(
                *_backward(
                    x.detach(), grad_y, s, z, qmin, qmax, axis,
                    need_params=need_s or need_z, z_host=ctx.z_host, observer=observer,
                ),
                z, qmin, qmax, ctx.z_host,
            )
        grad_inside, scale_sum, outside = result
        grad_scale = grad_zero_point = None
        if need_s:
            grad_scale = param_grad(scale_sum * g, *ctx.param_meta[0])
        if need_z:
            scale64 = s.item() if isinstance(outside, float) else s.reshape(-1).double()
            grad_zero_point = param_grad(outside * scale64 * -g, *ctx.param_meta[1])
        grad_x = grad_inside.to(grad_dtype) if need_x else None
        return grad_x, grad_scale, grad_zero_point, None, None, None, None, None


def _recomputed_sums(
    grad_x: torch.Tensor, sums: torch.Tensor | None, z: torch.Tensor, qmin: int, qmax: int, z_host: float | None
) -> tuple[torch.Tensor, Sum | None, Sum | None]:
    """dX, sum(dY * factor of dS) and the sum of dY outside the grid, from _backward's sums
    (``combine_grid_sums``).

    One channel on the host takes the same float64 operations on Python floats: a dozen tensor
    calls fewer, which is most of a small tensor's backward.
    """
    if sums is None:
        return grad_x, None, None
    if z_host is not None and sums.shape[1] == 1 and sums.device.type == "cpu":
        (below, rounding, above), zp = sums.reshape(-1).tolist(), z_host
    else:
        (below, rounding, above), zp = sums, z.reshape(-1).double()
    return grad_x, *combine_grid_sums(below, rounding, above, zp, qmin, qmax)


class _FakeQuantizeFn(torch.autograd.Function):
    """Fixed-qparam fake quantization: straight-through dX = dY inside the grid."""

    @staticmethod
    def forward(ctx: Any, x, scale, zero_point, quant_min, quant_max, axis):  # noqa: ANN001
        s, z = _qparams(x, scale, zero_point, quant_min, quant_max, axis)
        ctx.save_for_backward(x, s, z)
        ctx.qrange = (quant_min, quant_max)
        ctx.axis = axis
        ctx.z_host = _host_zero_point(z)
        return _fake_quantize_values(x, s, z, quant_min, quant_max, axis, ctx.z_host)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):  # noqa: ANN205
        x, s, z = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        grad_x, _ = _backward(
            x.detach(), grad_y.to(s.dtype), s, z, qmin, qmax, ctx.axis,
            need_params=False, z_host=ctx.z_host, observer=getattr(ctx, "chunk_observer", None),
        )
        return grad_x.to(grad_y.dtype), None, None, None, None, None


def _check_call(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int, ch_axis: int | None
) -> int | None:
    check_quant_range(quant_min, quant_max)
    if not x.is_floating_point():
        raise ValueError(f"fake quantization needs a floating-point input, got {x.dtype}")
    if ch_axis is None:
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise ValueError(
                f"per-tensor fake quantization needs one scale and one zero_point, got "
                f"{scale.numel()} and {zero_point.numel()}; pass ch_axis for per-channel"
            )
        return None
    if x.dim() == 0:
        raise ValueError("per-channel fake quantization needs an input with at least one dimension")
    axis = normalize_axis(ch_axis, x.dim())
    channels = x.shape[axis]
    if scale.numel() != channels or zero_point.numel() != channels:
        raise ValueError(
            f"per-channel fake quantization along ch_axis {ch_axis} needs {channels} scales and "
            f"zero points, got {scale.numel()} and {zero_point.numel()}"
        )
    return axis


def learnable_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    *,
    ch_axis: int | None = None,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Fake-quantize ``x`` with gradients for x, scale and zero point (LSQ/LSQ+).

    ``ch_axis=None`` quantizes per tensor (one scale); otherwise per channel along ``ch_axis``.
    """
    axis = _check_call(x, scale, zero_point, quant_min, quant_max, ch_axis)
    if compiling():
        return FusedLearnableFakeQuantizeFn.apply(x, scale, zero_point, quant_min, quant_max, axis, float(grad_factor))
    return _LearnableFakeQuantizeFn.apply(
        x, scale, zero_point, quant_min, quant_max, axis, float(grad_factor), torch.is_grad_enabled()
    )


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | int,
    quant_min: int,
    quant_max: int,
    *,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` with fixed qparams; dX passes through inside the grid only."""
    if not isinstance(scale, torch.Tensor):
        _check_scale_value(scale)
        scale = torch.tensor([float(scale)], device=x.device)
    if not isinstance(zero_point, torch.Tensor):
        zero_point = torch.tensor([float(zero_point)], device=x.device)
    axis = _check_call(x, scale, zero_point, quant_min, quant_max, ch_axis)
    return apply_fake_quantize(x, scale, zero_point, quant_min, quant_max, axis)


def apply_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int, axis: int | None
) -> torch.Tensor:
    """``fake_quantize`` on checked arguments (``axis`` in [0, x.dim())): the chunked kernels
    eagerly, their whole-tensor formulation (``eqcore.quant.fused``) under torch.compile."""
    function = FusedFakeQuantizeFn if compiling() else _FakeQuantizeFn
    return function.apply(x, scale, zero_point, quant_min, quant_max, axis)


def _check_scale_value(scale: float) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
