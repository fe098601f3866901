"""bench_fake_quant.py's compiled lines: fake quantizers under torch.compile against torch eager.

Every quantizer of one case is calibrated on the same data by the same kind of observer, then
learns its qparams (QAT); each line is the ratio torch eager / that step, all measured in one
interleaved run. The plain-op LSQ reference is the same math as torch autograd ops (rounding and
the gradient scale through detach), which inductor differentiates and fuses itself. The memory
floor is ``x * scale`` compiled: the bytes a quantizer that keeps x must move, with next to no
arithmetic, so torch eager / floor bounds every compiled line on this machine.
"""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from eqcore._torch_ao import _LearnableFakeQuantize
from eqcore._torchao import quiet_imports
from eqcore.quant.modules import EQLearnableFakeQuantize

with quiet_imports():
    from torchao.quantization.pt2e import MinMaxObserver, PerChannelMinMaxObserver
    from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize


def use_cold_inductor_cache() -> None:
    """Make compile times cold: inductor caches its kernels on disk, so this run gets (and at its
    end removes) a cache of its own, unless TORCHINDUCTOR_CACHE_DIR is set."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="eq-bench-inductor-")
        atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


class PlainLSQ(nn.Module):
    """LSQ+ as plain differentiable torch ops, with the qparams of an eqcore quantizer."""

    def __init__(self, like: EQLearnableFakeQuantize, axis: int | None) -> None:
        super().__init__()
        self.scale = nn.Parameter(like.scale.detach().clone())
        self.zero_point = nn.Parameter(like.zero_point.detach().clone())
        self.qmin, self.qmax, self.axis = like.quant_min, like.quant_max, axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = 1.0 / (x.numel() * self.qmax) ** 0.5
        shape = [1] * x.dim()
        if self.axis is not None:
            shape[self.axis] = -1
        s = _scaled_grad(self.scale, g).clamp_min(torch.finfo(torch.float32).eps).reshape(shape or ())
        z = _round_ste(_scaled_grad(self.zero_point, g)).clamp(self.qmin, self.qmax).reshape(shape or ())
        q = torch.clamp(_round_ste(x * torch.reciprocal(s)) + z, self.qmin, self.qmax)
        return (q - z) * s


class MemoryFloor(nn.Module):
    """``x * scale`` with a learnable scale (per channel for the weight case): fused and compiled, it
    moves the bytes a quantizer that keeps x must (forward reads x and writes y; backward reads x and
    dY, writes dX and sums per channel) and computes next to nothing, so torch eager / this line is
    the most any such compiled quantizer can reach on this machine."""

    def __init__(self, like: EQLearnableFakeQuantize, axis: int | None, ndim: int) -> None:
        super().__init__()
        shape = [1] * ndim
        if axis is not None:
            shape[axis] = -1
        self.scale = nn.Parameter(like.scale.detach().clone().reshape(shape if axis is not None else ()))
        self.zero_point = nn.Parameter(torch.zeros(()))  # unused: forward_backward clears its grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _scaled_grad(t: torch.Tensor, g: float) -> torch.Tensor:
    return (t - t * g).detach() + t * g


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    return (torch.round(t) - t).detach() + t


def torchao_like(ours: EQLearnableFakeQuantize) -> nn.Module:
    """torchao's pt2e ``LearnableFakeQuantize`` with the scheme and the qparams of ``ours``, learning them."""
    per_channel = ours.is_per_channel
    fq = LearnableFakeQuantize(
        PerChannelMinMaxObserver if per_channel else MinMaxObserver,
        ours.quant_min, ours.quant_max, use_grad_scaling=ours.use_grad_scaling,
        dtype=ours.dtype, qscheme=ours.qscheme, **({"ch_axis": ours.ch_axis} if per_channel else {}),
    )
    fq._initialize_or_update_qparams(ours.scale.detach().clone(), ours.zero_point.detach().clone())
    fq.enable_range_learning()
    return fq


def report_compiled(
    name: str,
    case: str,
    data: torch.Tensor,
    repeats: int,
    make_quantizer: Callable[[type, str, int], nn.Module],
    forward_backward: Callable[[nn.Module, torch.Tensor, torch.Tensor], Callable[[], None]],
    interleaved_ms: Callable[..., dict[str, list[float]]],
) -> None:
    """Eager and compiled steps of every quantizer on one case, as ratios to torch eager."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    grad = torch.randn_like(data)
    quantizers: dict[str, nn.Module] = {}
    for label, cls in (("torch", _LearnableFakeQuantize), ("ours", EQLearnableFakeQuantize)):
        fq = make_quantizer(cls, case, data.shape[0])
        fq(data)
        fq.enable_param_learning()
        quantizers[label] = fq
    quantizers["torchao"] = torchao_like(quantizers["ours"])  # the same observer kind calibrated ours
    quantizers["plain-op LSQ"] = PlainLSQ(quantizers["ours"], None if case == "act" else 0)
    quantizers["memory floor"] = MemoryFloor(quantizers["ours"], None if case == "act" else 0, data.dim())
    runs: dict[str, Callable[[], None]] = {}
    compile_s: dict[str, float] = {}
    for label, fq in quantizers.items():
        if label not in ("plain-op LSQ", "memory floor"):
            runs[f"{label} eager"] = forward_backward(fq, data.clone().requires_grad_(), grad)
        step = forward_backward(torch.compile(fq), data.clone().requires_grad_(), grad)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step()  # compiles forward and backward
        compile_s[label] = time.perf_counter() - start
        runs[f"{label} compiled"] = step
    timings = interleaved_ms(runs, repeats)
    anchor = timings["torch eager"]
    print(f"compiled: {name} (median of {repeats}; ratio = torch eager / line, > 1 is faster)")
    print(f"  {'line':24s} {'ms':>9s} {'ratio':>7s} {'per-repeat':>10s} {'compile s':>10s}")
    for label, times in timings.items():
        pairs = statistics.median(a / t for a, t in zip(anchor[1:], times[1:]))
        first = compile_s.get(label.removesuffix(" compiled")) if label.endswith("compiled") else None
        compiled = f"{first:10.1f}" if first is not None else f"{'':10s}"
        print(f"  {label:24s} {times[0]:9.3f} {anchor[0] / times[0]:6.2f}x {pairs:9.2f}x {compiled}")
    limit = timings["plain-op LSQ compiled"][0] / timings["ours compiled"][0]
    print(f"  ours compiled against the compiled plain-op LSQ reference: {limit:.2f}x (> 1 is faster)")
    floor = timings["memory floor compiled"][0] / timings["ours compiled"][0]
    print(
        f"  ours compiled against the memory floor (x * s, compiled): {floor:.2f}x; no quantizer that keeps x "
        f"can beat {anchor[0] / timings['memory floor compiled'][0]:.2f}x torch eager here"
    )
