"""A whole-model QAT step, eager and under torch.compile, with three kinds of fake quantizer.

resnet18 (seeded init) prepared by eqcore (``prepare(..., "w8a8", backend="fx")``: BN folded,
per-channel symmetric int8 weights, per-tensor affine uint8 activations), calibrated on seeded
data, then switched to QAT (qparams learned). Three copies of that model differ only in their
fake-quantizer class, each holding the same qparams:

- ours: ``EQLearnableFakeQuantize``;
- torch: torch.ao's ``_LearnableFakeQuantize``;
- torchao: torchao's pt2e ``LearnableFakeQuantize`` (the anchor of the new flow);
- no quantizers: every quantizer replaced by ``nn.Identity`` (the BN-folded float model), the
  floor: torch compiled / this line is the most any fake quantizer could reach.

A step is forward, cross-entropy loss, backward and an SGD step, at batch 8 on 224x224 inputs.
Each copy runs eagerly and ``torch.compile``d; the steps take turns repeat by repeat, and the
table prints each one's median and its ratio to torch's compiled step (> 1 is faster) and to
torchao's compiled step, plus each compiled copy's compile time (its first step, less one eager
step).

Usage: python benchmarks/bench_qat_step.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 8


def _swap_quantizers(model: nn.Module, build: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A copy of ``model`` with every eqcore quantizer replaced by ``build(quantizer)``."""
    from eqcore.quant.modules import EQLearnableFakeQuantize

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, EQLearnableFakeQuantize):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, build(module))
    return model


def _torch_quantizer(ours: nn.Module) -> nn.Module:
    from eqcore._torch_ao import _LearnableFakeQuantize, tq

    per_channel = ours.is_per_channel
    fq = _LearnableFakeQuantize(
        observer=tq.PerChannelMinMaxObserver if per_channel else tq.MinMaxObserver,
        quant_min=ours.quant_min, quant_max=ours.quant_max, dtype=ours.dtype, qscheme=ours.qscheme,
        channel_len=ours.scale.numel() if per_channel else -1, use_grad_scaling=ours.use_grad_scaling,
        **({"ch_axis": ours.ch_axis} if per_channel else {}),
    )
    fq.scale.data = ours.scale.detach().clone()
    fq.zero_point.data = ours.zero_point.detach().clone()
    fq.enable_param_learning()
    return fq


def _step(model: nn.Module, data: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    forward = model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(forward(data), target).backward()
        optimizer.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compiled_lines import torchao_like, use_cold_inductor_cache

    use_cold_inductor_cache()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    from eqcore.models.zoo import get_model
    from eqcore.prepare.calibrate import calibrate
    from eqcore.prepare.quantize import prepare
    from eqcore.quant.toggles import enable_param_learning

    torch.manual_seed(0)
    zoo = get_model("resnet18")
    prepared = prepare(zoo.model, "w8a8", zoo.example_inputs(), backend="fx")
    data = torch.randn(BATCH, 3, 224, 224)
    target = torch.randint(0, 1000, (BATCH,))
    calibrate(prepared.model, [data])
    ours = prepared.model.train()
    ours.apply(enable_param_learning)
    models = {
        "ours": ours,
        "torch": _swap_quantizers(ours, _torch_quantizer),
        "torchao": _swap_quantizers(ours, torchao_like),
        "float": _swap_quantizers(ours, lambda _: nn.Identity()),
    }
    steps: dict[str, Callable[[], None]] = {}
    compile_s: dict[str, float] = {}
    for label, model in models.items():
        eager = _step(model, data, target)
        eager()  # warm
        start = time.perf_counter()
        eager()
        eager_s = time.perf_counter() - start
        steps[f"{label} eager"] = eager
        compiled_model = copy.deepcopy(model)
        compiled = _step(torch.compile(compiled_model), data, target)
        start = time.perf_counter()
        compiled()
        compile_s[label] = time.perf_counter() - start - eager_s
        steps[f"{label} compiled"] = compiled
        print(f"{label}: compiled in {compile_s[label]:.1f} s", flush=True)
    for step in steps.values():
        step()  # second calls settle (a compiled backward's first run, allocator state)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"resnet18 QAT step, batch {BATCH}, 224x224, torch.set_num_threads({args.threads}), "
          f"median of {args.repeats}, torch {torch.__version__}, CPU")
    print(f"{'step':20s} {'ms':>9s} {'vs torch compiled':>18s} {'vs torchao compiled':>20s} {'compile s':>10s}")
    for name, median in medians.items():
        label = name.split()[0]
        compiled = f"{compile_s[label]:10.1f}" if name.endswith("compiled") else f"{'':10s}"
        print(f"{name:20s} {median * 1e3:9.1f} {medians['torch compiled'] / median:17.2f}x "
              f"{medians['torchao compiled'] / median:19.2f}x {compiled}")
    ceiling = medians["torch compiled"] / medians["float compiled"]
    print(f"float (no quantizers) compiled is the floor: no quantizer can beat {ceiling:.2f}x torch compiled here")


if __name__ == "__main__":
    main()
