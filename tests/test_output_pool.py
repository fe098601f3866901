"""Recycled output storage of the fake-quant kernels (eqcore.quant.pool): reuse only what nothing holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eqcore.quant.functional import learnable_fake_quantize
from eqcore.quant.pool import OUTPUT_POOL, OutputPool, release_buffers

SHAPE = (8, 16, 48, 48)  # 1.2 MiB in float32: above the pool's 1 MiB floor


def quantize(seed: int, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = (torch.randn(SHAPE) * 3).requires_grad_(requires_grad)
    return x, learnable_fake_quantize(x, torch.tensor([0.05]), torch.tensor([3.0]), -128, 127)


def test_an_output_nothing_holds_is_recycled() -> None:
    _, y = quantize(0)
    address = y.data_ptr()
    del y
    _, again = quantize(1)
    assert again.data_ptr() == address
    assert again._base is None and again.is_contiguous() and again.shape == SHAPE


@pytest.mark.parametrize("holder", ["tensor", "view", "numpy", "graph"])
def test_an_output_still_referenced_is_never_overwritten(holder: str) -> None:
    _, y = quantize(0)
    expected = y.clone()
    weight = torch.ones((), requires_grad=True)
    if holder == "tensor":
        kept = y
    elif holder == "view":
        kept, expected = y[1:, 2], expected[1:, 2]
    elif holder == "numpy":
        kept = y.numpy()
    else:  # the next layer's graph saved y for its backward
        kept = (y * weight).sum()
    address = y.data_ptr()
    del y
    for seed in range(1, 4):  # more calls than the pool has idle storage
        _, other = quantize(seed)
        assert other.data_ptr() != address
    if holder == "numpy":
        np.testing.assert_array_equal(kept, expected.numpy())
    elif holder == "graph":
        kept.backward()
        assert torch.equal(weight.grad, expected.sum())
    else:
        assert torch.equal(kept, expected)


def test_dx_of_one_step_survives_the_next_while_x_grad_holds_it() -> None:
    x, y = quantize(0, requires_grad=True)
    y.backward(torch.full(SHAPE, 2.0))
    first = x.grad
    snapshot = first.clone()
    y2 = learnable_fake_quantize(x, torch.tensor([0.07]), torch.tensor([1.0]), -128, 127)
    (dx,) = torch.autograd.grad(y2, x, torch.full(SHAPE, -1.0))
    assert dx.data_ptr() != first.data_ptr()
    assert torch.equal(first, snapshot)


def test_the_pool_holds_at_most_max_bytes_and_releases_idle_storage() -> None:
    pool = OutputPool(max_bytes=3 << 20, min_bytes=1 << 20)
    device = torch.device("cpu")
    a = pool.empty((1 << 18,), torch.float32, device)  # 1 MiB each
    b = pool.empty((1 << 18,), torch.float32, device)
    c = pool.empty((1 << 18,), torch.float32, device)
    assert pool.held_bytes == 3 << 20
    d = pool.empty((1 << 18,), torch.float32, device)  # over the cap: an ordinary allocation
    assert pool.held_bytes == 3 << 20 and len({t.data_ptr() for t in (a, b, c, d)}) == 4
    small = pool.empty((1000,), torch.float32, device)  # under the floor: never pooled
    assert pool.held_bytes == 3 << 20 and small.numel() == 1000
    del a, b
    assert pool.release() == 2 << 20
    assert pool.held_bytes == 1 << 20
    del c
    assert pool.release() == 1 << 20 and pool.held_bytes == 0
    assert d.numel() == 1 << 18


def test_idle_storage_of_an_old_shape_makes_room_for_a_new_one() -> None:
    pool = OutputPool(max_bytes=3 << 20, min_bytes=1 << 20)
    device = torch.device("cpu")
    old = pool.empty((1 << 18,), torch.float32, device)  # 1 MiB
    kept = pool.empty((1 << 18,), torch.float32, device)
    del old  # idle now
    new = pool.empty((3 << 17,), torch.float32, device)  # 1.5 MiB: over the cap unless the idle one goes
    assert pool.held_bytes == (1 << 20) + (3 << 17) * 4
    assert new.untyped_storage().nbytes() == (3 << 17) * 4 and kept.numel() == 1 << 18


def test_storage_freed_behind_the_pool_is_not_handed_out_again() -> None:
    pool = OutputPool(max_bytes=8 << 20)
    device = torch.device("cpu")
    t = pool.empty((1 << 18,), torch.float32, device)
    t.untyped_storage().resize_(0)  # as FSDP-style code frees a tensor's memory in place
    del t
    again = pool.empty((1 << 18,), torch.float32, device)
    again.fill_(1.0)
    assert again.untyped_storage().nbytes() == 1 << 20 and float(again.sum()) == float(1 << 18)


def test_release_buffers_frees_the_global_pools_idle_storage() -> None:
    _, y = quantize(0)
    nbytes = y.numel() * y.element_size()
    del y
    held = OUTPUT_POOL.held_bytes
    assert release_buffers() >= nbytes
    assert OUTPUT_POOL.held_bytes <= held - nbytes
