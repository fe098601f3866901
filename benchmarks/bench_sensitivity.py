"""Cost of the per-layer sensitivity report on resnet18 (seeded init, w8a8, ``samples`` data).

Data: the built-in ``samples`` source at batch 8: calibration on its 4 seeded crop batches, and
2 evaluation batches (its first two crop batches: the 7 photos alone make one batch). Prints,
with ``torch.set_num_threads`` as given (default 2):

- the anchor: one plain evaluation pass (``collect_logits`` of the calibrated model, every
  quantizer on, over the 2 batches);
- ``per_layer_sensitivity`` over the same 2 batches (float, all-on, weights-only,
  activations-only passes, isolated and leave-one-out per layer, local errors, SA pass), and the
  same with the graph replay off (every per-layer pass a full forward), to show what it saves;
- each as the median of ``--repeats`` runs, wall clock and CPU time, and as a ratio to the
  anchor's median (the report costs that many plain evaluation passes).

Usage: python benchmarks/bench_sensitivity.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 8
EVAL_BATCHES = 2


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from eqcore.analysis.evaluate import collect_logits
    from eqcore.analysis.sensitivity import per_layer_sensitivity
    from eqcore.models.loaders import get_loaders
    from eqcore.models.zoo import get_model
    from eqcore.prepare.calibrate import calibrate
    from eqcore.prepare.quantize import prepare

    torch.manual_seed(0)
    zoo = get_model("resnet18")
    loaders = get_loaders("samples", zoo.spec, batch_size=BATCH, calib_batches=4, seed=0)
    prepared = prepare(zoo.model, "w8a8", zoo.example_inputs())
    calibrate(prepared.model, loaders.calib)
    batches = [batch for batch in itertools.islice(loaders.calib, EVAL_BATCHES)]
    report = per_layer_sensitivity(prepared, batches)  # warm-up, and the figures printed below

    def anchor() -> None:
        collect_logits(prepared.model, batches, "cpu")

    def full_report() -> None:
        per_layer_sensitivity(prepared, batches)

    def without_replay() -> None:
        per_layer_sensitivity(prepared, batches, replay=False)

    cases = {"anchor: one evaluation pass": anchor, "per_layer_sensitivity": full_report,
             "per_layer_sensitivity, no replay": without_replay}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    anchor_wall = statistics.median(t[0] for t in times["anchor: one evaluation pass"])
    anchor_cpu = statistics.median(t[1] for t in times["anchor: one evaluation pass"])
    print(f"resnet18 w8a8, samples, batch {BATCH}, {EVAL_BATCHES} eval batches, torch threads {args.threads}, "
          f"median of {args.repeats}; {len(report.layers)} layers, {report.samples} images")
    for name, runs in times.items():
        wall, cpu = statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs)
        print(f"  {name:34s} wall {wall:7.2f} s ({wall / anchor_wall:5.1f}x anchor)   "
              f"cpu {cpu:7.2f} s ({cpu / anchor_cpu:5.1f}x anchor)")
    print(f"  Spearman(SA score, isolated sweep) = {report.spearman:.2f}; all quantizers "
          f"{report.all_quantizers.sqnr_db:.2f} dB")


if __name__ == "__main__":
    main()
