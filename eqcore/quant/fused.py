"""The compile path: fake quantization as plain tensor ops, for torch.compile to fuse.

The chunked kernels (``eqcore.quant.kernels``) are fast eagerly because they read values on the
host and loop over cache-sized chunks; a compiler can trace neither well. Under torch.compile,
``learnable_fake_quantize`` and ``fake_quantize`` run these autograd functions instead: the same
numerics (the module docstring of ``eqcore.quant.functional``) written as whole-tensor
elementwise ops and reductions, which dynamo traces with no graph break and inductor fuses into
one kernel for the forward and one or two for the backward (or into the neighbouring ops).

The forward is the same float operations as the eager kernels, so y is bit-identical; the
backward recomputes the grid position from x (only x, s and z are kept, as eagerly for
activations), so dX is identical, and it sums dY below, inside (times u - round(u)) and above the
grid per channel in the compute dtype, then combines the sums in float64 exactly as the eager
backward does: dS and dZ differ from eager only by the order of the float32 summation, and every
edge policy (ties, NaN, +-inf, clamped zero points, empty inputs) follows from the same formulas.
"""

from __future__ import annotations

from typing import Any

import torch

EPS = torch.finfo(torch.float32).eps


def compiling() -> bool:
    """True while torch.compile traces: the quantizers then take this module's functions."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 inputs compute in float64; every other floating dtype in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def channel_view(t: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """Per-tensor qparams as a 0-d tensor; per-channel ones shaped to broadcast along ``axis``."""
    if axis is None:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def qparams(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale clamped to eps and the rounded, clamped zero point, shaped to broadcast over x."""
    dtype = compute_dtype(x)
    s = scale.detach().to(dtype=dtype).clamp_min(EPS)
    z = torch.round(zero_point.detach().to(dtype=dtype)).clamp(qmin, qmax)
    return channel_view(s, x.dim(), axis), channel_view(z, x.dim(), axis)


def _grid(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u = x * (1/s) as torch's kernels compute it, round(u) (half to even) and q = round(u) + z."""
    u = x.to(s.dtype) * torch.reciprocal(s)
    rounded = torch.round(u)
    return u, rounded, rounded + z


def fake_quantize_values(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """y = (clamp(round(x * (1/s)) + z, qmin, qmax) - z) * s, in x's dtype, to the bit.

    Two details keep every bit of the eager kernels where a compiler could otherwise change
    them. The clamp is two selects, so a NaN passes through with its own bits (inductor's
    vectorised minimum/maximum would replace it by another NaN). And a grid value of 0 is
    written as +0.0: eagerly, adding z turns round's -0.0 into +0.0, but where the compiler
    knows z is 0 (a symmetric scheme's zero point) it drops that addition.
    """
    _, _, q = _grid(x, s, z)
    clamped = torch.where(q < qmin, qmin, torch.where(q > qmax, qmax, q))
    level = clamped - z
    return torch.where(level == 0, 0.0, level * s).to(x.dtype)


Sum = torch.Tensor | float
"""A float64 sum per channel, or a Python float (a float64 too) for one channel on the host."""


def combine_grid_sums(below: Sum, rounding: Sum, above: Sum, zp: Sum, qmin: int, qmax: int) -> tuple[Sum, Sum]:
    """sum(dY * factor of dS) and the sum of dY outside the grid, from the three grid sums.

    ``below`` and ``above`` sum dY below and above the grid, ``rounding`` sums dY * (u - round(u))
    inside it. The factor of dS is round(u) - u inside, qmin - z below and qmax - z above the grid.
    The outside sum adds rounding * 0: 0, or NaN in a channel that held a NaN input, so that dZ
    carries it too. Both backward paths (chunked and fused) finish with this.
    """
    return below * (qmin - zp) + above * (qmax - zp) - rounding, below + above + rounding * 0


def param_grad(value: Sum, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A float64 gradient (tensor or Python float) as the parameter's shape and dtype."""
    if isinstance(value, float):
        value = torch.tensor(value, dtype=torch.float64)
    return value.reshape(shape).to(dtype)


def _channel_sum(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Sum over every dimension but ``axis`` (all of them per tensor), in float64."""
    dims = [d for d in range(t.dim()) if d != axis]
    return (t.sum(dims) if dims else t).double()


def _grad_x(dy: torch.Tensor, q: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """dY where qmin <= q <= qmax, else 0 (a NaN q is not inside)."""
    return torch.where((q >= qmin) & (q <= qmax), dy, torch.zeros_like(dy))


class FusedLearnableFakeQuantizeFn(torch.autograd.Function):
    """``learnable_fake_quantize``'s numerics in whole-tensor ops, for torch.compile."""

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
    ) -> torch.Tensor:
        s, z = qparams(x, scale, zero_point, quant_min, quant_max, axis)
        ctx.save_for_backward(x, s, z)
        ctx.qrange, ctx.axis, ctx.grad_factor = (quant_min, quant_max), axis, grad_factor
        ctx.param_meta = ((scale.shape, scale.dtype), (zero_point.shape, zero_point.dtype))
        return fake_quantize_values(x, s, z, quant_min, quant_max)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, s, z = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        need_x, need_s, need_z = ctx.needs_input_grad[:3]
        dy = grad_y.to(s.dtype)
        u, rounded, q = _grid(x, s, z)
        grad_x = _grad_x(dy, q, qmin, qmax).to(grad_y.dtype) if need_x else None
        if not (need_s or need_z):
            return grad_x, None, None, None, None, None, None
        below, above = q < qmin, q > qmax
        zeros = torch.zeros_like(dy)
        axis, g = ctx.axis, ctx.grad_factor
        # The three sums of the eager backward, per channel; a NaN x falls in the rounding sum.
        sum_below = _channel_sum(torch.where(below, dy, zeros), axis)
        sum_above = _channel_sum(torch.where(above, dy, zeros), axis)
        rounding = _channel_sum(torch.where(below | above, zeros, dy * (u - rounded)), axis)
        scale_sum, outside = combine_grid_sums(sum_below, rounding, sum_above, z.reshape(-1).double(), qmin, qmax)
        grad_scale = grad_zero_point = None
        if need_s:
            grad_scale = param_grad(scale_sum * g, *ctx.param_meta[0])
        if need_z:
            grad_zero_point = param_grad(outside * s.reshape(-1).double() * -g, *ctx.param_meta[1])
        return grad_x, grad_scale, grad_zero_point, None, None, None, None


class FusedFakeQuantizeFn(torch.autograd.Function):
    """``fake_quantize``'s numerics (fixed qparams, straight-through dX) in whole-tensor ops."""

    @staticmethod
    def forward(ctx: Any, x, scale, zero_point, quant_min, quant_max, axis):  # noqa: ANN001
        s, z = qparams(x, scale, zero_point, quant_min, quant_max, axis)
        ctx.save_for_backward(x, s, z)
        ctx.qrange = (quant_min, quant_max)
        return fake_quantize_values(x, s, z, quant_min, quant_max)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):  # noqa: ANN205
        x, s, z = ctx.saved_tensors
        _, _, q = _grid(x, s, z)
        grad_x = _grad_x(grad_y.to(s.dtype), q, *ctx.qrange).to(grad_y.dtype)
        return grad_x, None, None, None, None, None
