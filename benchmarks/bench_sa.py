"""Cost of sensitivity-analysis hooks: resnet18 prepared with w8a8, batch 8 at 224x224, 2 threads.

Prints, for one forward + ``output.mean().backward()``:

- time: SA hooks on every activation quantizer vs the same pass without hooks. Passes run
  interleaved (plain, hooked, plain, ...) so drifts in machine speed hit both alike; reported
  as the ratio of medians and the median of adjacent-pair ratios, wall clock and CPU time;
- peak memory: each configuration in its own fresh subprocess; after building and calibrating
  the model (no-grad passes), the RSS is taken as baseline, the kernel's high-water mark is
  reset (/proc/self/clear_refs), two forward + backward passes run, and the high-water mark
  minus the baseline is the passes' peak (ru_maxrss since process start where clear_refs is
  missing). Twice: with the default malloc (median of 5: one process's peak moves by up to
  100 MiB with where the dynamic mmap threshold lets large tensors land in the heap), and with
  glibc's mmap threshold fixed at 128 KiB, where every run gives the same peak to the MiB;
- for reference, ``run_sensitivity_analysis`` (hooks with scores, plus weight histograms) on one
  batch, against the plain pass.

Usage: python benchmarks/bench_sa.py [--repeats N] [--skip-memory]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THREADS = 2
BATCH = 8


def _seed_qconfig_model(model: torch.nn.Module, example: torch.Tensor) -> tuple[torch.nn.Module, str]:
    """The SA tutorial's qconfig loop (w8a8: per-channel int8 weights, uint8 activations)."""
    from eqcore._torch_ao import QConfig, QConfigMapping, _LearnableFakeQuantize, prepare_qat_fx, tq

    try:
        from eqcore.quant.modules import EQLearnableFakeQuantize as learnable

        kind = "EQLearnableFakeQuantize"
    except ImportError:
        learnable, kind = _LearnableFakeQuantize, "torch _LearnableFakeQuantize"
    act = learnable.with_args(
        observer=tq.HistogramObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
        scale=1.0,
        zero_point=0.0,
        use_grad_scaling=True,
    )
    mapping = QConfigMapping()
    for name, module in model.named_modules():
        if hasattr(module, "out_channels"):
            weight = learnable.with_args(
                observer=tq.PerChannelMinMaxObserver,
                quant_min=-128,
                quant_max=127,
                dtype=torch.qint8,
                qscheme=torch.per_channel_symmetric,
                scale=0.1,
                zero_point=0.0,
                use_grad_scaling=True,
                channel_len=module.out_channels,
            )
            mapping.set_module_name(name, QConfig(activation=act, weight=weight))
    model.eval()
    prepared = prepare_qat_fx(model, mapping, (example,))
    try:
        from eqcore.prepare.fusion import qat_convbn_to_conv

        prepared.eval()
        prepared = qat_convbn_to_conv(prepared)
        kind += " + qat_convbn_to_conv"
    except ImportError:
        pass
    return prepared, f"seed qconfig loop ({kind})"


def build_model() -> tuple[torch.nn.Module, torch.Tensor, str]:
    """resnet18 (seeded init) prepared with w8a8 and calibrated on random batches."""
    import torchvision

    from eqcore._torch_ao import FakeQuantizeBase

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    example = torch.randn(1, 3, 224, 224)
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(BATCH, 3, 224, 224, generator=generator) for _ in range(2)]
    try:
        from eqcore.prepare.calibrate import calibrate
        from eqcore.prepare.quantize import prepare_model

        prepared, how = prepare_model(model, "w8a8", (example,)), "eqcore.prepare_model(w8a8) + calibrate"
        calibrate(prepared, calibration)
    except ImportError:
        prepared, how = _seed_qconfig_model(model, example)
        prepared.eval()
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
        for module in prepared.modules():
            if isinstance(module, FakeQuantizeBase):
                module.enable_observer(False)
    batch = torch.randn(BATCH, 3, 224, 224, generator=generator)
    return prepared, batch, how


def one_pass(model: torch.nn.Module, batch: torch.Tensor) -> None:
    for parameter in model.parameters():
        parameter.grad = None
    model(batch).mean().backward()


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_hooks(model: torch.nn.Module, batch: torch.Tensor, repeats: int) -> dict[str, float]:
    from eqcore.analysis.sa_hooks import add_sensitivity_analysis_hooks

    plain, hooked = [], []
    for _ in range(2):
        one_pass(model, batch)
    forward, backward = add_sensitivity_analysis_hooks(model)
    hooked_modules = len(forward.hook_handles)
    one_pass(model, batch)
    forward.reset()
    backward.reset()
    for _ in range(repeats):
        plain.append(timed(lambda: one_pass(model, batch)))
        forward, backward = add_sensitivity_analysis_hooks(model)
        hooked.append(timed(lambda: one_pass(model, batch)))
        forward.reset()
        backward.reset()
    result = {}
    for column, label in ((0, "wall"), (1, "cpu")):
        p = [t[column] for t in plain]
        h = [t[column] for t in hooked]
        result[f"{label}_plain_s"] = statistics.median(p)
        result[f"{label}_hooked_s"] = statistics.median(h)
        result[f"{label}_ratio_of_medians"] = statistics.median(h) / statistics.median(p)
        result[f"{label}_median_pair_ratio"] = statistics.median(b / a for a, b in zip(p, h))
    result["hooked_modules"] = hooked_modules
    return result


def time_full_pass(model: torch.nn.Module, batch: torch.Tensor, repeats: int) -> float:
    from eqcore.analysis.sa_run import run_sensitivity_analysis

    ratios = []
    for _ in range(repeats):
        plain = timed(lambda: one_pass(model, batch))[0]
        full = timed(lambda: run_sensitivity_analysis(model, [batch], batches=1))[0]
        ratios.append(full / plain)
    return statistics.median(ratios)


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_child(mode: str) -> None:
    """Run in a fresh process: peak RSS of two passes, over the RSS before them (KiB)."""
    torch.set_num_threads(THREADS)
    model, batch, _ = build_model()
    hooks = None
    if mode == "sa":
        from eqcore.analysis.sa_hooks import add_sensitivity_analysis_hooks

        hooks = add_sensitivity_analysis_hooks(model)
    gc.collect()
    baseline = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss since process start"
    for _ in range(2):
        one_pass(model, batch)
    peak = _rss_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if hooks is not None:
        for store in hooks:
            store.reset()
    print(json.dumps({"mode": mode, "baseline_kib": baseline, "peak_kib": peak, "method": method}))


FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
"""glibc's malloc with its mmap threshold fixed at 128 KiB: every large tensor gets its own
mapping, returned to the system when freed, so the high-water mark counts the pass's memory and
not where the default (dynamic) threshold let large tensors land in the heap."""


def measure_memory(runs: int = 5, malloc_env: dict[str, str] | None = None) -> dict[str, object]:
    """Median over ``runs`` fresh processes per configuration, alternating: with the default
    malloc, one process's peak moves by tens of MiB with where the large tensors land."""
    peaks: dict[str, list[int]] = {"plain": [], "sa": []}
    method = ""
    for _ in range(runs):
        for mode in ("plain", "sa"):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", mode],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore", **(malloc_env or {})},
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[mode].append(result["peak_kib"] - result["baseline_kib"])
            method = result["method"]
    plain, sa = statistics.median(peaks["plain"]), statistics.median(peaks["sa"])
    return {
        "plain_peak_delta_mib": plain / 1024,
        "sa_peak_delta_mib": sa / 1024,
        "ratio": sa / plain,
        "runs": runs,
        "all_mib": {mode: [round(p / 1024) for p in values] for mode, values in peaks.items()},
        "method": method,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", choices=("plain", "sa"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.memory_child:
        memory_child(args.memory_child)
        return
    torch.set_num_threads(THREADS)
    model, batch, how = build_model()
    print(f"torch {torch.__version__}, torch.set_num_threads({THREADS}), batch {BATCH}x3x224x224")
    print(f"model: resnet18 (seeded init), {how}")
    timing = time_hooks(model, batch, args.repeats)
    print(
        f"time, forward+backward ({args.repeats} interleaved repeats): "
        f"plain {timing['wall_plain_s']:.3f} s, SA hooks {timing['wall_hooked_s']:.3f} s "
        f"({timing['hooked_modules']} activation quantizers)"
    )
    print(
        f"  SA/plain wall: ratio of medians {timing['wall_ratio_of_medians']:.3f}, "
        f"median pair ratio {timing['wall_median_pair_ratio']:.3f}"
    )
    print(
        f"  SA/plain cpu:  ratio of medians {timing['cpu_ratio_of_medians']:.3f}, "
        f"median pair ratio {timing['cpu_median_pair_ratio']:.3f}"
    )
    full = time_full_pass(model, batch, max(3, args.repeats // 3))
    print(f"run_sensitivity_analysis (scores + weight histograms, 1 batch) / plain pass: {full:.3f}")
    if not args.skip_memory:
        print("peak memory over baseline, median of fresh processes (MiB of every run in brackets):")
        for label, runs, env in (("default malloc", 5, None), ("mmap threshold fixed", 3, FIXED_MMAP_THRESHOLD)):
            memory = measure_memory(runs, env)
            print(
                f"  {label} ({memory['method']}, {memory['runs']} each): "
                f"plain {memory['plain_peak_delta_mib']:.0f} MiB, SA hooks {memory['sa_peak_delta_mib']:.0f} MiB, "
                f"ratio {memory['ratio']:.3f} {memory['all_mib']}"
            )


if __name__ == "__main__":
    main()
