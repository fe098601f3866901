"""The backward of one chunk: its views and work rows, its grid sums, and its two paths.

``_chunk_by_range`` (CPU only) reads the chunk's grid range on the host and builds masks only for
the sides that have values; ``_chunk_exact`` takes any device and any content (NaN, inf) without
reading a value back. ``eqcore.quant.kernels._backward`` runs them over a tensor's chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

_hardtanh_backward = torch.ops.aten.hardtanh_backward


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
