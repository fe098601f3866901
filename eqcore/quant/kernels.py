"""The chunked kernels of fake quantization: forward values, the factor-keeping forward, the backward.

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

``CHUNK`` and ``KEEP_FACTOR`` are tunables read by this module (set them here); the backward of
one chunk, which ``_backward`` runs over a tensor's chunks, is in ``eqcore.quant.chunk_backward``.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from eqcore.quant.chunk_backward import _Chunk, _Sums, _chunk_by_range, _chunk_exact, _hardtanh_backward
from eqcore.quant.pool import OUTPUT_POOL

CHUNK = 1 << 18
"""Elements per chunk: the working set of a chunk's passes stays in the CPU's caches."""

_buffers = threading.local()


def _reads_host(t: torch.Tensor) -> bool:
    """Whether the kernels may read values of ``t`` on the host: only when it is in host memory.

    On the CPU, reading a tensor's value is a memory load, not a synchronisation, so the kernels
    use a uniform zero point as a Python number (scalar grid bounds save passes) and look at each
    chunk's grid range (to skip the work its content does not need). On any other device they
    never read a value back, so forward and backward never stall the device's stream. (Under
    torch.compile the quantizers run ``eqcore.quant.fused`` instead of these kernels.)
    """
    return t.device.type == "cpu"


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
