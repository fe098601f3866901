"""Fake quantization: exact autograd functions and drop-in torch.ao fake-quant modules.

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

Forward and backward are built from vectorised elementwise ops and reductions, a cache-sized
chunk at a time. On a GPU they never read a value back to the host, so they never stall the
stream. On the CPU, where tensors are host memory and reading one is a plain load, they read a
uniform zero point (scalar grid bounds save passes) and each chunk's grid range in the
backward: a chunk with every value inside the grid gets dX = dY with no masks, masks are built
only for the sides that have values, and only chunks holding NaN or inf take the general path.

A tensor quantized per channel with a learnable scale (a weight, in practice) keeps one more
buffer of its size from the forward: each element's factor of dS (round(u) - u inside the grid,
qmin - z and qmax - z outside), which also tells where dX passes. Its backward is then three
passes (dX, and dY times the factor summed per channel) instead of recomputing the grid position
from x. Per-tensor quantization (activations, in practice) recomputes, so training keeps no extra
activation-sized tensor.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from eqcore.quant.pool import OUTPUT_POOL, compiling, release_buffers
from eqcore._torch_ao import FakeQuantizeBase, tq

EPS = torch.finfo(torch.float32).eps
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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_view(t: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    if axis is None:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _qparams(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale clamped to eps and the rounded, clamped zero point, shaped to broadcast over x."""
    dtype = _compute_dtype(x)
    s = scale.detach().to(dtype=dtype).clamp_min(EPS)
    z = torch.round(zero_point.detach().to(dtype=dtype)).clamp_(qmin, qmax)
    return _channel_view(s, x.dim(), axis), _channel_view(z, x.dim(), axis)


CHUNK = 1 << 18
"""Elements per chunk: the working set of a chunk's passes stays in the CPU's caches."""

_hardtanh_backward = torch.ops.aten.hardtanh_backward
_buffers = threading.local()


def _reads_host(t: torch.Tensor) -> bool:
    """Whether the kernels may read values of ``t`` on the host: only when it is in host memory.

    On the CPU, reading a tensor's value is a memory load, not a synchronisation, so the kernels
    use a uniform zero point as a Python number (scalar grid bounds save passes) and look at each
    chunk's grid range (to skip the work its content does not need). On any other device, and
    while torch.compile traces, they never read a value back, so forward and backward never
    stall the device's stream or break the compiled graph.
    """
    return t.device.type == "cpu" and not compiling()


def _host_zero_point(z: torch.Tensor) -> float | None:
    """The rounded zero point as a Python number, when the host may read it and all channels share it."""
    if not _reads_host(z) or z.numel() == 0:
        return None
    if z.numel() == 1:
        value = z.item()
        return value if math.isfinite(value) else None
    low, high = torch.aminmax(z.reshape(-1))
    low, high = low.item(), high.item()
    return low if low == high and math.isfinite(low) else None


def _chunk_buffers(dtype: torch.dtype, device: torch.device, size: int | None = None) -> torch.Tensor:
    """At least ``size`` elements (three CHUNK-sized work rows by default: 1 MiB a row in float32)
    of scratch, kept per thread on the CPU."""
    size = 3 * CHUNK if size is None else size
    if device.type != "cpu":
        return torch.empty(size, dtype=dtype, device=device)
    cache = getattr(_buffers, "cache", None)
    if cache is None:
        cache = _buffers.cache = {}
    work = cache.get(dtype)
    if work is None or work.numel() < size:
        work = cache[dtype] = torch.empty(size, dtype=dtype)
    return work


def _chunks(pre: int, channels: int, post: int, size: int | None = None) -> list[tuple[slice, slice, slice]]:
    """Contiguous slices of a (pre, channels, post) tensor of at most about ``size`` (CHUNK) elements."""
    size = CHUNK if size is None else size
    if pre * channels * post == 0:
        return []
    if channels * post <= size:
        rows = max(1, size // (channels * post))
        return [(slice(p, min(p + rows, pre)), slice(None), slice(None)) for p in range(0, pre, rows)]
    if post <= size:
        width = max(1, size // post)
        return [
            (slice(p, p + 1), slice(c, min(c + width, channels)), slice(None))
            for p in range(pre)
            for c in range(0, channels, width)
        ]
    return [
        (slice(p, p + 1), slice(c, c + 1), slice(t, min(t + size, post)))
        for p in range(pre)
        for c in range(channels)
        for t in range(0, post, size)
    ]


def _as_3d(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View as (pre, channels, post) around the channel axis (channels = 1 per tensor)."""
    if axis is None:
        return t.reshape(1, 1, t.numel())
    pre = math.prod(t.shape[:axis])
    return t.reshape(pre, t.shape[axis], math.prod(t.shape[axis + 1 :]))


def _fake_quantize_values(
    x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, axis: int | None, z_host: float | None
) -> torch.Tensor:
    """y = (clamp(round(x * (1/s)) + z, qmin, qmax) - z) * s, a cache-sized chunk at a time.

    The same float operations as torch's kernels, so outputs are bit-identical to
    torch.fake_quantize_per_{tensor,channel}_affine (adding z also turns round's -0.0 into +0.0).
    With the zero point known on the host, clamping round(u) to [qmin - z, qmax - z] gives the same
    integers in two fewer passes; adding 0.0 then does the -0.0 to +0.0 that adding z did.
    """
    dtype = s.dtype
    x3 = _as_3d(x.detach(), axis)
    y = OUTPUT_POOL.empty(x.shape, dtype, x.device)
    y3 = _as_3d(y, axis)  # a view for the chunks; y itself is returned, so it is not a view
    # 3-d qparams, never 0-d: a 0-d float32 1/s would let a float16 x multiply in float16.
    inv = torch.reciprocal(s).reshape(1, -1, 1)
    s3, z3 = s.reshape(1, -1, 1), z.reshape(1, -1, 1)
    per_tensor = axis is None
    for rows, cols, cells in _chunks(*x3.shape):
        out = y3[rows, cols, cells]
        inv_c, s_c = (inv, s3) if per_tensor else (inv[:, cols], s3[:, cols])
        torch.mul(x3[rows, cols, cells], inv_c, out=out).round_()
        if z_host is not None:
            out.clamp_(qmin - z_host, qmax - z_host).add_(0.0).mul_(s_c)
            continue
        z_c = z3 if per_tensor else z3[:, cols]
        out.add_(z_c).clamp_(qmin, qmax).sub_(z_c).mul_(s_c)
    return y.to(x.dtype)


KEEP_FACTOR = True
"""Whether learnable per-channel fake quantization stores the factor of dS in the forward
(_keeps_factor). Set it to False to save that buffer (one per weight, until its backward) at the
cost of the faster backward; the tests switch it off to run the recomputing backward."""


def _keeps_factor(x: torch.Tensor, axis: int | None, z_host: float | None, qmin: int, qmax: int) -> bool:
    """Whether the forward also stores each element's factor of dS (_fake_quantize_keeping_factor).

    For tensors quantized per channel, in practice weights (a parameter, or a conv's weight scaled
    by its folded batch norm in QAT): the factor costs one buffer of x's size between forward and
    backward, and the backward takes three passes instead of eight (each channel's maximum sits on
    the rounding tie, so every chunk has values above the grid and the recomputing backward builds
    masks everywhere). Tensors quantized per tensor, activations in practice, recompute from x:
    their chunks mostly have nothing clamped and need no masks (measured slower with the factor),
    and training keeps no extra activation-sized tensor. CPU only, with a uniform zero point
    strictly inside [qmin, qmax]: the factors outside the grid (qmin - z, qmax - z) are then at
    least 1 in magnitude and those inside at most 1/2, so the factor also tells where dX passes.
    """
    return KEEP_FACTOR and axis is not None and _reads_host(x) and z_host is not None and qmin < z_host < qmax


def _fake_quantize_keeping_factor(
    x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, axis: int, z_host: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """y as _fake_quantize_values makes it, and f: each element's factor of dS.

    f = round(u) - u inside the grid, qmin - z below and qmax - z above it, so that
    dS = g * sum(dY * f) and dX = dY where |f| < 1. +-inf land outside like any clamped value; a
    NaN makes f NaN, which the backward's sum shows (it then recomputes from x). Each chunk works
    in its own part of f and y, so its passes touch three buffers, and the chunks are twice the
    recomputing path's: with fewer passes per chunk, fewer calls win over cache reuse.
    """
    dtype = s.dtype
    x3 = _as_3d(x.detach(), axis)
    y = OUTPUT_POOL.empty(x.shape, dtype, x.device)
    factor = OUTPUT_POOL.empty(x.shape, dtype, x.device)
    y3, f3 = _as_3d(y, axis), _as_3d(factor, axis)
    inv, s3 = torch.reciprocal(s).reshape(1, -1, 1), s.reshape(1, -1, 1)
    lo, hi = qmin - z_host, qmax - z_host
    for rows, cols, cells in _chunks(*x3.shape, 2 * CHUNK):
        u, r = f3[rows, cols, cells], y3[rows, cols, cells]  # u in f's chunk, round(u) in y's
        torch.mul(x3[rows, cols, cells], inv[:, cols], out=u)
        torch.round(u, out=r)
        _hardtanh_backward.grad_input(u, r, lo - 0.5, hi + 0.5, grad_input=u)  # u inside the grid, 0 outside
        r.clamp_(lo, hi).add_(0.0)  # the grid value; + 0.0 turns round's -0.0 into +0.0
        torch.sub(r, u, out=u)
        r.mul_(s3[:, cols])
    return y.to(x.dtype), factor


def _backward_from_factor(
    factor: torch.Tensor, grad_y: torch.Tensor, axis: int, need_z: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """dX, sum(dY * f) and (with need_z) the sum of dY outside the grid, per channel in float64.

    dX is written over f, which nothing reads after this backward (a second backward through a
    retained graph recomputes from x), and returned on its storage. None when a sum is not
    finite (a NaN in x, a NaN or inf in dY): the caller then recomputes from x, which places
    every such value by the documented policy (+-inf in x are outside factors, finite).
    """
    f3, dy3 = _as_3d(factor, axis), _as_3d(grad_y, axis)
    size = 2 * CHUNK
    work = _chunk_buffers(factor.dtype, factor.device, 2 * size)
    sums = 2 if need_z else 1
    totals = torch.zeros((sums, f3.shape[1]), dtype=torch.float64)
    for rows, cols, cells in _chunks(*f3.shape, size):
        fc, dyc = f3[rows, cols, cells], dy3[rows, cols, cells]
        prods = work[: sums * fc.numel()].view(sums, *fc.shape)
        torch.mul(dyc, fc, out=prods[0])
        _hardtanh_backward.grad_input(dyc, fc, -1.0, 1.0, grad_input=fc)  # dX, over f
        if need_z:
            torch.sub(dyc, fc, out=prods[1])  # dY outside the grid: exactly dY - dX
        totals[:, cols] += prods.sum((1, 3))
    if not bool(torch.isfinite(totals).all()):
        return None
    grad_x = torch.empty(0, dtype=factor.dtype).set_(factor.untyped_storage(), 0, factor.shape)
    return grad_x, totals[0], totals[1] if need_z else None


class _Chunk:
    """One chunk's views for the backward: x, dY, dX and three work rows shaped like them.

    Row 0 holds the grid position (then dY below the grid), row 1 the residual u - round(u)
    (then its product with dX), row 2 dY above the grid: the rows a chunk needs are contiguous,
    so one reduction sums them all.
    """

    __slots__ = ("dx", "dy", "rows", "x")

    def __init__(self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, work: torch.Tensor) -> None:
        self.x, self.dy, self.dx = x, dy, dx
        self.rows = work[: 3 * x.numel()].view(3, *x.shape)  # contiguous, so the rows reduce as one

    @property
    def position(self) -> torch.Tensor:
        return self.rows[0]

    @property
    def residual(self) -> torch.Tensor:
        return self.rows[1]


def _grid_sums(chunk: _Chunk, lo: float, hi: float, below: bool, above: bool, dy_inside: torch.Tensor, sums: _Sums) -> None:
    """Add the chunk's (below, rounding, above) sums to ``sums``.

    rounding sums ``dy_inside`` * (u - round(u)); below and above sum dY where the grid position
    is below lo or above hi, and take no pass where ``below``/``above`` say the chunk has none.
    Per tensor the rounding sum is a dot product; per channel one reduction sums the needed rows.
    """
    rows, dy = chunk.rows, chunk.dy
    if above:
        _hardtanh_backward.grad_input(dy, rows[0], hi, math.inf, grad_input=rows[2])
    if below:  # overwrites the position, which nothing needs after this
        _hardtanh_backward.grad_input(dy, rows[0], -math.inf, lo, grad_input=rows[0])
    first, last = (0 if below else 1), (3 if above else 2)
    if not sums.per_channel:
        part = sums.next_part()
        torch.dot(dy_inside.reshape(-1), rows[1].reshape(-1), out=part[1])
        for index in (0, 2):
            if first <= index < last:  # the part of a side without values stays 0
                torch.sum(rows[index].reshape(-1), 0, out=part[index])
        return
    rows[1].mul_(dy_inside)
    sums.pending.append((first, last, sums.cols, rows[first:last].sum((1, 3))))


class _Sums:
    """Where the chunks' sums go: per tensor, one float32 row per chunk; per channel, each chunk's
    rows for its channels. ``result`` adds them up in float64."""

    def __init__(self, chunks: int, channels: int | None, dtype: torch.dtype, device: torch.device) -> None:
        self.cols: slice | None = None  # the channels of the current chunk, per channel
        self.index = 0
        self.per_channel = channels is not None
        if channels is None:
            self.parts = torch.zeros((chunks, 3), dtype=dtype, device=device)
        else:
            self.channels, self.device = channels, device
            self.pending: list[tuple[int, int, slice, torch.Tensor]] = []

    def next_part(self) -> torch.Tensor:
        self.index += 1
        return self.parts[self.index - 1]

    def result(self) -> torch.Tensor:
        if not self.per_channel:
            return self.parts.double().sum(0).reshape(3, 1)
        total = torch.zeros((3, self.channels), dtype=torch.float64, device=self.device)
        for first, last, cols, part in self.pending:
            total[first:last, cols] += part
        return total


def _chunk_by_range(
    chunk: _Chunk,
    inv: torch.Tensor,
    z: torch.Tensor,
    z_host: float | None,
    qmin: int,
    qmax: int,
    sums: _Sums | None,
    feed: Callable[..., None] | None = None,
) -> str | None:
    """The backward of one chunk, steered by its grid range read on the host (CPU only).

    u = x * (1/s) and round(u) as the forward computes them; the minimum and maximum grid
    position tell whether any element lies below or above the grid. Where none does, dX is dY
    and the rounding sum is dot(dY, u - round(u)); otherwise masks are built for the sides that
    have elements only. ``sums`` receives the sums (None: dX only); ``feed`` gets u, round(u),
    dY and x first. Returns "inside" where every value is inside the grid (dX is dY: the chunk's
    dX is left unwritten), "masked" where dX was written, and None for a chunk holding NaN or
    inf, which takes the exact general path.
    """
    position, residual = chunk.position, chunk.residual
    torch.mul(chunk.x, inv, out=residual)
    torch.round(residual, out=position)
    if feed is not None:  # row 2 is free until the masks: the feeder's scratch
        feed(residual.view(-1), position.view(-1), chunk.dy.reshape(-1), chunk.x.reshape(-1), chunk.rows[2].view(-1))
    if sums is not None:
        residual.sub_(position)  # u - round(u); NaN where an inf made it, caught below
    if z_host is None:
        position.add_(z)
        lo, hi = qmin - 0.5, qmax + 0.5
    else:
        lo, hi = qmin - z_host - 0.5, qmax - z_host + 0.5
    low, high = (v.item() for v in torch.aminmax(position))
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    below, above = low < lo, high > hi
    if below or above:
        _hardtanh_backward.grad_input(chunk.dy, position, lo, hi, grad_input=chunk.dx)
    if sums is not None:  # all inside, dX is dY: the rounding sum reads dY
        _grid_sums(chunk, lo, hi, below, above, chunk.dx if below or above else chunk.dy, sums)
    return "masked" if below or above else "inside"


def _chunk_exact(chunk: _Chunk, inv: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, sums: _Sums | None) -> None:
    """The backward of one chunk on any device and any content, with no value read on the host.

    +-inf become values just beyond any grid; a NaN keeps a NaN residual, which carries it into
    dS and dZ, and is placed below the grid, so dX leaves it out.
    """
    span = float(qmax - qmin + 1)
    position, residual = chunk.position, chunk.residual
    torch.mul(chunk.x, inv, out=residual).clamp_(-span, span)
    torch.round(residual, out=position)
    residual.sub_(position)
    position.nan_to_num_(nan=-span).add_(z)
    lo, hi = qmin - 0.5, qmax + 0.5
    _hardtanh_backward.grad_input(chunk.dy, position, lo, hi, grad_input=chunk.dx)
    if sums is not None:
        # dX * residual, not a masked residual: 0 * NaN keeps a NaN input's NaN in the sum.
        _grid_sums(chunk, lo, hi, True, True, chunk.dx, sums)


def _backward(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None,
    *,
    need_params: bool,
    z_host: float | None = None,
    observer: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dX, and the per-channel sums (below, rounding, above) that dS and dZ are made of.

    Recomputes the grid position of x (only x is kept between forward and backward, as torch's
    kernels do): u = x * (1/s), q = round(u) + z. rounding sums dY * (u - round(u)) inside the
    grid, below and above sum dY below and above it. The work runs a cache-sized chunk at a time
    in small reused buffers, so the passes stay in cache and no large temporary is allocated:
    dX is the one new tensor, and not even that where no value lies outside the grid (dX is
    then dY, returned as it is, as autograd does for an identity).
    """
    dtype = s.dtype
    x3, dy3 = _as_3d(x, axis), _as_3d(grad_y, axis)
    grad_x = OUTPUT_POOL.empty(x.shape, dtype, x.device)
    gx3 = _as_3d(grad_x, axis)
    inv = torch.reciprocal(s).reshape(1, -1, 1)
    z3 = z.reshape(1, -1, 1)
    work = _chunk_buffers(dtype, x.device)
    chunks = _chunks(*x3.shape)
    per_tensor = axis is None
    by_range = _reads_host(x)
    sums = _Sums(len(chunks), None if per_tensor else x3.shape[1], dtype, x.device) if need_params else None
    feed = None
    if observer is not None:  # offered u and round(u) only where they are read on the host
        feed = observer.begin(grad_y, inv.item() if by_range and per_tensor else None, CHUNK)
    # Chunks with every value inside the grid, whose dX is dY: copied once a chunk needs masks,
    # and never where no chunk does, as dX is then dY itself.
    unwritten: list[_Chunk] | None = []
    for rows, cols, cells in chunks:
        chunk = _Chunk(x3[rows, cols, cells], dy3[rows, cols, cells], gx3[rows, cols, cells], work)
        inv_c, z_c = (inv, z3) if per_tensor else (inv[:, cols], z3[:, cols])
        if sums is not None and not per_tensor:
            sums.cols = cols
        done = _chunk_by_range(chunk, inv_c, z_c, z_host, qmin, qmax, sums, feed) if by_range else None
        if done == "inside":
            if unwritten is None:
                chunk.dx.copy_(chunk.dy)
            else:
                unwritten.append(chunk)
            continue
        for earlier in unwritten or ():
            earlier.dx.copy_(earlier.dy)
        unwritten = None
        if done is None:
            if feed is not None:
                observer.abort()
                feed = None
            _chunk_exact(chunk, inv_c, z_c, qmin, qmax, sums)
    if feed is not None:
        observer.end()
    return grad_y if unwritten is not None else grad_x, sums.result() if sums is not None else None


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
            grad_scale = _param_grad(scale_sum * g, *ctx.param_meta[0])
        if need_z:
            scale64 = s.item() if isinstance(outside, float) else s.reshape(-1).double()
            grad_zero_point = _param_grad(outside * scale64 * -g, *ctx.param_meta[1])
        grad_x = grad_inside.to(grad_dtype) if need_x else None
        return grad_x, grad_scale, grad_zero_point, None, None, None, None, None


Sum = torch.Tensor | float
"""A float64 sum per channel, or a Python float (a float64 too) for one channel on the host."""


def _recomputed_sums(
    grad_x: torch.Tensor, sums: torch.Tensor | None, z: torch.Tensor, qmin: int, qmax: int, z_host: float | None
) -> tuple[torch.Tensor, Sum | None, Sum | None]:
    """dX, sum(dY * factor of dS) and the sum of dY outside the grid, from _backward's sums.

    The factor is round(u) - u inside, qmin - z below and qmax - z above the grid. The outside sum
    adds rounding * 0: 0, or NaN in a channel that held a NaN input, so that dZ carries it too.
    One channel on the host takes the same float64 operations on Python floats: a dozen tensor
    calls fewer, which is most of a small tensor's backward.
    """
    if sums is None:
        return grad_x, None, None
    if z_host is not None and sums.shape[1] == 1 and sums.device.type == "cpu":
        (below, rounding, above), zp = sums.reshape(-1).tolist(), z_host
    else:
        (below, rounding, above), zp = sums, z.reshape(-1).double()
    return grad_x, below * (qmin - zp) + above * (qmax - zp) - rounding, below + above + rounding * 0


def _param_grad(value: Sum, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A float64 gradient (tensor or Python float) as the parameter's shape and dtype."""
    if isinstance(value, float):
        value = torch.tensor(value, dtype=torch.float64)
    return value.reshape(shape).to(dtype)


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
    return _FakeQuantizeFn.apply(x, scale, zero_point, quant_min, quant_max, axis)


def _check_scale_value(scale: float) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")


def _is_symmetric(qscheme: torch.qscheme) -> bool:
    return qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def _is_per_channel(qscheme: torch.qscheme) -> bool:
    return qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)


def _build_observer(observer: Any, quant_min: int, quant_max: int, observer_kwargs: dict) -> nn.Module:
    observer_kwargs = {**observer_kwargs, "quant_min": quant_min, "quant_max": quant_max}
    dtype = observer_kwargs.get("dtype") or getattr(getattr(observer, "p", None), "keywords", {}).get("dtype")
    if dtype is not None and dtype in (torch.quint8, torch.qint8, torch.qint32, torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if quant_min < info.min or quant_max > info.max:
            raise ValueError(
                f"quant_min..quant_max ({quant_min}..{quant_max}) does not fit the observer dtype "
                f"{dtype} ({info.min}..{info.max}); pass a wider dtype, e.g. dtype=torch.qint32"
            )
    return observer(**observer_kwargs)


class _FlagsMixin:
    """Python mirrors of the uint8 state buffers, so forward reads no device memory."""

    def _sync_flags(self) -> None:
        self._fake_quant_on = bool(self.fake_quant_enabled[0])
        self._observer_on = bool(self._observer_buffer()[0])

    def _observer_buffer(self) -> torch.Tensor:
        return self.observer_enabled

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_flags()

    def enable_fake_quant(self, enabled: bool = True) -> None:
        self.fake_quant_enabled[0] = int(enabled)
        self._fake_quant_on = bool(enabled)

    def toggle_fake_quant(self, enabled: bool = True):  # noqa: ANN201
        self.enable_fake_quant(enabled)
        return self


class EQLearnableFakeQuantize(_FlagsMixin, FakeQuantizeBase):
    """Learnable fake quantizer, a drop-in for torch.ao's ``_LearnableFakeQuantize``.

    Same constructor, methods, buffers and state dict keys; faster and exact at the edges (see
    the module docstring). Modes: static estimation (observer sets scale/zero point), param
    learning (scale/zero point trained by backprop), static observation (observe, no fake quant).
    """

    def __init__(
        self,
        observer: Any = tq.MovingAverageMinMaxObserver,
        quant_min: int = 0,
        quant_max: int = 255,
        scale: float = 1.0,
        zero_point: float = 0.0,
        channel_len: int = -1,
        use_grad_scaling: bool = False,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__()
        check_quant_range(quant_min, quant_max)
        _check_scale_value(scale)
        if not (channel_len == -1 or (isinstance(channel_len, int) and channel_len > 0)):
            raise ValueError(f"channel_len must be -1 (per tensor) or a positive int, got {channel_len!r}")
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.use_grad_scaling = use_grad_scaling
        count = 1 if channel_len == -1 else channel_len
        self.channel_len = channel_len
        self.scale = nn.Parameter(torch.full((count,), float(scale)))
        self.zero_point = nn.Parameter(torch.full((count,), float(zero_point)))
        self.activation_post_process = _build_observer(observer, quant_min, quant_max, observer_kwargs)
        self.dtype = self.activation_post_process.dtype
        self.qscheme = self.activation_post_process.qscheme
        self.ch_axis = getattr(self.activation_post_process, "ch_axis", -1)
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("static_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("learning_enabled", torch.tensor([0], dtype=torch.uint8))
        self.bitwidth = int(math.log2(quant_max - quant_min + 1))
        self.register_buffer("eps", torch.tensor([EPS]))
        if _is_symmetric(self.qscheme):
            self.zero_point.data.zero_()
        self._sync_flags()

    def _observer_buffer(self) -> torch.Tensor:
        return self.static_enabled

    def _sync_flags(self) -> None:
        super()._sync_flags()
        self._learning_on = bool(self.learning_enabled[0])

    @property
    def is_per_channel(self) -> bool:
        return _is_per_channel(self.qscheme)

    def enable_param_learning(self) -> EQLearnableFakeQuantize:
        """Learn scale and zero point by backprop; the observer stops updating them."""
        self.toggle_qparam_learning(enabled=True).toggle_fake_quant(enabled=True).toggle_observer_update(enabled=False)
        return self

    def enable_static_estimate(self) -> EQLearnableFakeQuantize:
        """Let the observer set scale and zero point (PTQ calibration); output is fake-quantized."""
        self.toggle_qparam_learning(enabled=False).toggle_fake_quant(enabled=True).toggle_observer_update(enabled=True)
        return self

    def enable_static_observation(self) -> EQLearnableFakeQuantize:
        """Observe data without updating qparams; output is the unquantized input."""
        self.toggle_qparam_learning(enabled=False).toggle_fake_quant(enabled=False).toggle_observer_update(enabled=True)
        return self

    def toggle_observer_update(self, enabled: bool = True) -> EQLearnableFakeQuantize:
        self.static_enabled[0] = int(enabled)
        self._observer_on = bool(enabled)
        return self

    def enable_observer(self, enabled: bool = True) -> None:
        self.toggle_observer_update(enabled)

    def toggle_qparam_learning(self, enabled: bool = True) -> EQLearnableFakeQuantize:
        self.learning_enabled[0] = int(enabled)
        self._learning_on = bool(enabled)
        self.scale.requires_grad = enabled
        self.zero_point.requires_grad = enabled
        return self

    def observe_quant_params(self) -> None:
        print(f"EQLearnableFakeQuantize Scale: {self.scale.detach()}")
        print(f"EQLearnableFakeQuantize Zero Point: {self.zero_point.detach()}")

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current (scale, integer zero point), the zero point rounded half to even and clamped."""
        self.scale.data.clamp_(min=EPS)
        scale = self.scale.detach()
        zero_point = torch.round(self.zero_point.detach()).clamp(self.quant_min, self.quant_max).long()
        return scale, zero_point

    def _observe(self, x: torch.Tensor) -> None:
        self.activation_post_process(x.detach())
        scale, zero_point = self.activation_post_process.calculate_qparams()
        scale = scale.to(self.scale.device, self.scale.dtype).reshape(-1)
        zero_point = zero_point.to(self.zero_point.device, self.zero_point.dtype).reshape(-1)
        if scale.shape != self.scale.shape:
            if self.channel_len != -1:
                raise ValueError(
                    f"channel_len={self.channel_len} does not match the {scale.numel()} channels "
                    f"the observer saw; set channel_len to the number of channels"
                )
            self.scale.data = scale.clone()
            self.zero_point.data = zero_point.clone()
        else:
            self.scale.data.copy_(scale)
            self.zero_point.data.copy_(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_channel = self.is_per_channel
        if per_channel and self.channel_len != -1:
            axis = normalize_axis(self.ch_axis, x.dim())
            if x.shape[axis] != self.channel_len:
                raise ValueError(
                    f"channel_len={self.channel_len} does not match the input's {x.shape[axis]} "
                    f"channels on axis {self.ch_axis} (input shape {tuple(x.shape)})"
                )
        if self._observer_on:
            self._observe(x)
        else:
            self.scale.data.clamp_(min=EPS)
        if not self._fake_quant_on:
            return x
        if _is_symmetric(self.qscheme):
            self.zero_point.data.zero_()
        grad_factor = grad_scaling_factor(x.numel(), self.quant_max) if self.use_grad_scaling else 1.0
        # Symmetric schemes pin z = 0: it gets no gradient, so an optimizer cannot move it.
        zero_point = self.zero_point.detach() if _is_symmetric(self.qscheme) else self.zero_point
        return learnable_fake_quantize(
            x,
            self.scale,
            zero_point,
            self.quant_min,
            self.quant_max,
            ch_axis=self.ch_axis if per_channel else None,
            grad_factor=grad_factor,
        )

    def extra_repr(self) -> str:
        return (
            f"quant_min={self.quant_min}, quant_max={self.quant_max}, qscheme={self.qscheme}, "
            f"ch_axis={self.ch_axis}, channels={self.scale.numel()}, "
            f"use_grad_scaling={self.use_grad_scaling}, fake_quant={self._fake_quant_on}, "
            f"observer={self._observer_on}, learning={self._learning_on}"
        )


class EQFakeQuantize(_FlagsMixin, FakeQuantizeBase):
    """Non-learnable fake quantizer, a drop-in for torch.ao's ``FakeQuantize``.

    Qparams come from the observer while it is enabled; the state dict matches ``FakeQuantize``.
    """

    def __init__(
        self,
        observer: Any = tq.MovingAverageMinMaxObserver,
        quant_min: int = 0,
        quant_max: int = 255,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__()
        check_quant_range(quant_min, quant_max)
        self.activation_post_process = _build_observer(observer, quant_min, quant_max, observer_kwargs)
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.dtype = self.activation_post_process.dtype
        self.qscheme = self.activation_post_process.qscheme
        self.ch_axis = getattr(self.activation_post_process, "ch_axis", -1)
        self.is_per_channel = _is_per_channel(self.qscheme)
        self.register_buffer("scale", torch.tensor([1.0], dtype=torch.float))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int))
        self._sync_flags()

    def enable_observer(self, enabled: bool = True) -> None:
        self.observer_enabled[0] = int(enabled)
        self._observer_on = bool(enabled)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.activation_post_process.calculate_qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer_on:
            self.activation_post_process(x.detach())
            scale, zero_point = self.calculate_qparams()
            scale = scale.to(self.scale.device)
            zero_point = zero_point.to(self.zero_point.device)
            if self.scale.shape != scale.shape:
                self.scale.resize_(scale.shape)
                self.zero_point.resize_(zero_point.shape)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        if not self._fake_quant_on:
            return x
        return _FakeQuantizeFn.apply(
            x,
            self.scale,
            self.zero_point,
            self.quant_min,
            self.quant_max,
            normalize_axis(self.ch_axis, x.dim()) if self.is_per_channel else None,
        )

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("scale", "zero_point"):
            value = state_dict.get(prefix + name)
            if value is not None:
                getattr(self, name).resize_(value.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"quant_min={self.quant_min}, quant_max={self.quant_max}, qscheme={self.qscheme}, "
            f"ch_axis={self.ch_axis}, fake_quant={self._fake_quant_on}, observer={self._observer_on}"
        )
