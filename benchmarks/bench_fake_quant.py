"""Forward+backward of EQLearnableFakeQuantize against torch.ao's _LearnableFakeQuantize.

Prints the median time over repeats for each quantizer on the same input, the ratio
(torch / ours, so > 1 means ours is faster), and a clone() of the input as the
memory-bandwidth floor. Run: python benchmarks/bench_fake_quant.py [--threads 2] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from eqcore._torch_ao import _LearnableFakeQuantize, tq
from eqcore.quantizers import EQLearnableFakeQuantize


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = {
        "activation 32x64x56x56, per-tensor affine uint8": ("act", torch.randn(32, 64, 56, 56) * 2 + 1),
        "weight 512x512x3x3, per-channel symmetric int8 (axis 0)": ("weight", torch.randn(512, 512, 3, 3) * 0.05),
    }
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads}), median of {args.repeats}, CPU")
    print(f"{'case':58s} {'clone ms':>9s} {'torch ms':>9s} {'ours ms':>9s} {'speedup':>8s}")
    for name, (case, data) in cases.items():
        timings = {}
        for label, cls in (("torch", _LearnableFakeQuantize), ("ours", EQLearnableFakeQuantize)):
            fq = make_quantizer(cls, case, data.shape[0])
            fq(data)  # calibrate qparams with the observer, then learn them as in QAT
            fq.enable_param_learning()
            x = data.clone().requires_grad_()
            grad = torch.randn_like(data)
            timings[label] = median_ms(forward_backward(fq, x, grad), args.repeats)
        clone = median_ms(data.clone, args.repeats)
        ratio = timings["torch"] / timings["ours"]
        print(f"{name:58s} {clone:9.2f} {timings['torch']:9.2f} {timings['ours']:9.2f} {ratio:7.2f}x")


if __name__ == "__main__":
    main()
