"""Forward+backward of EQLearnableFakeQuantize against torch.ao's _LearnableFakeQuantize.

Both run on the same input, interleaved repeat by repeat (so drift in the machine's speed hits
both alike). Prints each one's median time, the speedup as the ratio of medians and as the
median of the per-repeat ratios (torch / ours, > 1 means ours is faster), and a clone() of the
input as the memory-bandwidth floor. The two cases the project's target is set on take a leaf
input, whose gradient accumulates into .grad; a third line takes the activation as a network's
intermediate (not a leaf). Then the same for three small tensors, where the fixed
per-call work (Python, autograd, about 0.3 ms for ours) outweighs the kernels.

Then the compiled lines (``--no-compiled`` skips them): the two target cases under
``torch.compile`` (inductor), each a ratio against torch's eager step measured in the same run:
ours eager and compiled, torch's and torchao's (pt2e ``LearnableFakeQuantize``) eager and
compiled, LSQ written as plain torch ops and compiled, and the memory floor (``x * scale``
compiled: the same bytes moved, next to no arithmetic, the bound of any compiled quantizer that
keeps x); plus each compiled quantizer's compile time (its first call).
Run: python benchmarks/bench_fake_quant.py [--threads 2] [--no-compiled]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from eqcore._torch_ao import _LearnableFakeQuantize, tq
from eqcore.quant.modules import EQLearnableFakeQuantize


FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
"""glibc's malloc with fixed thresholds: blocks up to 32 MiB come from the heap, which is given
back to the system only above 256 MiB free, so freed pages are reused without faults."""


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    return interleaved_ms({"only": fn}, repeats, warmup)["only"][0]


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Per function: [median ms, then every repeat's ms], the functions taking turns."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: [statistics.median(t), *t] for name, t in times.items()}


def make_quantizer(cls: type, case: str, channels: int) -> torch.nn.Module:
    if case == "act":
        fq = cls(
            observer=tq.MinMaxObserver,
            quant_min=0,
            quant_max=255,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
            use_grad_scaling=True,
        )
    else:
        fq = cls(
            observer=tq.PerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            use_grad_scaling=True,
            channel_len=channels,
        )
    return fq


def forward_backward(fq: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """A QAT step of ``fq`` on ``x``: gradients accumulate into x (when a leaf) and the qparams;
    for a non-leaf x (an intermediate of a network) its gradient is returned, not accumulated."""
    if not x.is_leaf:
        return lambda: torch.autograd.grad(fq(x), (x, fq.scale, fq.zero_point), grad)

    def run() -> None:
        x.grad = None
        fq.scale.grad = None
        fq.zero_point.grad = None
        fq(x).backward(grad)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--malloc", choices=("default", "fixed"), default="default")
    args = parser.parse_args()
    if args.malloc == "fixed" and not set(FIXED_MALLOC) <= set(os.environ):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **FIXED_MALLOC})
    if args.compiled:
        from compiled_lines import use_cold_inductor_cache

        use_cold_inductor_cache()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = {
        "activation 32x64x56x56, per-tensor affine uint8": ("act", torch.randn(32, 64, 56, 56) * 2 + 1),
        "weight 512x512x3x3, per-channel symmetric int8 (axis 0)": ("weight", torch.randn(512, 512, 3, 3) * 0.05),
    }
    malloc = "glibc thresholds fixed" if set(FIXED_MALLOC) <= set(os.environ) else "default malloc"
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads}), median of {args.repeats}, CPU, {malloc}")
    print(f"{'case':58s} {'clone ms':>9s} {'torch ms':>9s} {'ours ms':>9s} {'speedup':>8s} {'per-repeat':>10s}")
    for name, (case, data) in cases.items():
        report(name, case, data, args.repeats)
    act = cases["activation 32x64x56x56, per-tensor affine uint8"][1]
    report("the same activation inside a network (not a leaf)", "act", act, args.repeats, leaf=False)
    print(f"small tensors, where the per-call work outweighs the kernels (median of {args.repeats * 10}):")
    small = {
        "weight 64x64x3x3, per-channel symmetric int8": ("weight", torch.randn(64, 64, 3, 3) * 0.05),
        "weight 128x64x1x1, per-channel symmetric int8": ("weight", torch.randn(128, 64, 1, 1) * 0.05),
        "activation 1x64x14x14, per-tensor affine uint8": ("act", torch.randn(1, 64, 14, 14) * 2 + 1),
    }
    for name, (case, data) in small.items():
        report(name, case, data, args.repeats * 10)
    if args.compiled:
        from compiled_lines import report_compiled

        for name, (case, data) in cases.items():
            report_compiled(name, case, data, args.repeats, make_quantizer, forward_backward, interleaved_ms)


def report(name: str, case: str, data: torch.Tensor, repeats: int, leaf: bool = True) -> None:
    """One line: clone, torch and ours (median ms of interleaved repeats) and the speedups."""
    runs = {}
    grad = torch.randn_like(data)
    for label, cls in (("torch", _LearnableFakeQuantize), ("ours", EQLearnableFakeQuantize)):
        fq = make_quantizer(cls, case, data.shape[0])
        fq(data)  # calibrate qparams with the observer, then learn them as in QAT
        fq.enable_param_learning()
        x = data.clone().requires_grad_()
        runs[label] = forward_backward(fq, x if leaf else x * 1.0, grad)
    timings = interleaved_ms(runs, repeats)
    clone = median_ms(data.clone, repeats)
    ratio = timings["torch"][0] / timings["ours"][0]
    pairs = statistics.median(t / o for t, o in zip(timings["torch"][1:], timings["ours"][1:]))
    print(
        f"{name:58s} {clone:9.3f} {timings['torch'][0]:9.3f} {timings['ours'][0]:9.3f} "
        f"{ratio:7.2f}x {pairs:9.2f}x"
    )


if __name__ == "__main__":
    main()
