"""Time per sensitivity-analysis plot: eqcore.plots' defaults against the seed's settings.

Data: resnet18 (torchvision, seeded init) prepared as in the SA tutorial (EQLearnableFakeQuantize,
per-channel int8 weights, uint8 activations with a HistogramObserver, conv-bn folded), calibrated
on the built-in photos, then one photo forward + ``output.mean().backward()`` with SA hooks on
every activation quantizer.

For each quantizer the same histogram is drawn and written as a PNG, in this process:

- ours: ``render_sa_hist`` + ``save_figure`` at the default size (8 x 6 in, 100 dpi);
- the seed's settings: pyplot figure 14 x 9 in saved at dpi 450, one ``axvline`` per
  quantization level, the histogram and gradients as dots plus smoothed curves, range lines,
  a legend and two intra-bin inset axes with multi-line titles (the seed's content, redrawn).

Prints the median time per plot (wall clock and CPU) of each, their ratio, and the throughput
of ``render_many`` with worker processes. Timings are medians over every quantizer and round;
other load on the machine shows up in wall clock more than in CPU time.

Usage: python benchmarks/bench_plots.py [--rounds N] [--seed-plots N] [--workers N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THREADS = 2


def tutorial_model() -> torch.nn.Module:
    """resnet18 quantized with the SA tutorial's qconfig loop, conv-bn folded, in eval mode."""
    import torchvision

    from eqcore._torch_ao import QConfig, QConfigMapping, prepare_qat_fx, tq
    from eqcore.prepare.fusion import convbn_to_conv
    from eqcore.quant.modules import EQLearnableFakeQuantize

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    act = EQLearnableFakeQuantize.with_args(
        observer=tq.HistogramObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
        qscheme=torch.per_tensor_affine, scale=1.0, zero_point=0.0, use_grad_scaling=True,
    )
    mapping = QConfigMapping()
    for name, module in model.named_modules():
        if hasattr(module, "out_channels"):
            weight = EQLearnableFakeQuantize.with_args(
                observer=tq.PerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                dtype=torch.qint8, qscheme=torch.per_channel_symmetric, scale=0.1,
                zero_point=0.0, use_grad_scaling=True, channel_len=module.out_channels,
            )
            mapping.set_module_name(name, QConfig(activation=act, weight=weight))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_fx(model, mapping, (torch.randn(1, 3, 224, 224),))
    prepared.eval()
    return convbn_to_conv(prepared)


def photo(name: str = "chelsea") -> torch.Tensor:
    """One built-in photo as a normalized 1 x 3 x 224 x 224 batch (Grace Hopper as fallback)."""
    from eqcore.models.samples import find_sample
    from eqcore.models.specs import eval_transform, imagenet_spec

    try:
        sample = find_sample(name)
    except Exception:
        sample = find_sample("grace_hopper")
    return eval_transform(imagenet_spec())(sample.load()).unsqueeze(0)


def sa_views() -> tuple[list[str], list]:
    """(names, HistogramViews with gradients) of every activation quantizer of resnet18."""
    from eqcore.models.samples import samples_loader
    from eqcore.models.specs import imagenet_spec
    from eqcore.analysis.sa_hooks import add_sensitivity_analysis_hooks
    from eqcore.plots.view import HistogramView
    from eqcore.quant.toggles import disable_PTQ_observer, enable_fake_quant, enable_PTQ_observer

    model = tutorial_model()
    model.apply(enable_fake_quant)
    model.apply(enable_PTQ_observer)
    with torch.no_grad():
        for images, _ in samples_loader(imagenet_spec(), split="calib", batch_size=8,
                                        n_augmented=16):
            model(images)
    model.apply(disable_PTQ_observer)
    forward, backward = add_sensitivity_analysis_hooks(model, bit_res=8)
    model(photo()).mean().backward()
    names = list(forward.data)
    views = [HistogramView.of(forward.data[n], backward.data.get(n)) for n in names]
    forward.reset()
    backward.reset()
    return names, views


def seed_settings_plot(view, path: Path, title: str) -> None:
    """The seed's SA figure content at its settings: 14 x 9 in, dpi 450, an axvline per level."""
    import matplotlib.pyplot as plt

    grid = view.grid
    scale, zero = float(view.scale[0]), int(view.zero_point[0])
    x = (grid.centers - zero) * scale
    forward = view.counts / max(view.counts.sum(), 1)
    grads = np.zeros_like(view.counts) if view.binned_grads is None else np.abs(view.binned_grads)
    grads = grads / grads.sum() if grads.sum() > 0 else grads
    zero_bin = np.isin(grid.qbin_of_bin, view.zero_point)
    profiles = []
    for pdf in (forward, grads):
        zero_mass = float(pdf[zero_bin].sum())
        pdf = np.where(zero_bin, 0.0, pdf)
        clamped = float(pdf[~grid.inside].sum())
        profiles.append((pdf, zero_mass, clamped))
    window = grid.bins_per_qbin * 5
    kernel = np.ones(window) / window

    fig, ax = plt.subplots(figsize=(14, 9))
    levels = (np.arange(grid.first_qbin, grid.last_qbin + 1) - zero) * scale
    for i, level in enumerate(levels):
        ax.axvline(level, color="black", linewidth=0.08,
                   label="Quantization bin centroids" if i == 0 else None)
    occupied = np.flatnonzero(view.counts > 0)
    for index, sign in ((occupied[0], -1), (occupied[-1], 1)):
        ax.axvline(x[index] + sign * scale, color="red", linewidth=1,
                   label="Tensor dynamic range" if sign < 0 else None)
    size = plt.rcParams["lines.markersize"] / 4
    for (pdf, _, _), style, label in zip(profiles, ("b", "g"), ("Tensor", "Grad")):
        ax.plot(x, pdf, f"{style}.", markersize=size, label=f"{label} Probability")
        ax.plot(x, np.convolve(pdf, kernel, mode="same"), f"{style}-",
                label=f"Smoothed {label} Prob.")
    ax.set_title(f"Sensitivity Analysis - {title}")
    ax.set_xlabel("Activation/Gradient value, overlain with quantization bins")
    ax.set_ylabel("Probability")
    ax.legend(loc="upper right")
    for rect, (pdf, zero_mass, clamped), color, name in zip(
        ([0.18, 0.60, 0.1, 0.1], [0.75, 0.43, 0.1, 0.1]), profiles, ("b", "g"),
        ("Forward Activation", "Gradients"),
    ):
        sub = fig.add_axes(rect)
        intra = pdf.reshape(-1, grid.bins_per_qbin).sum(axis=0)
        sub.bar(range(grid.bins_per_qbin), intra, color=color)
        sub.set_xticks([0, grid.bins_per_qbin / 2, grid.bins_per_qbin])
        sub.set_title(
            f"{name}\nMean Intra-bin Behavior\n(Not-on-quant-bin-centroid\nprob mass: "
            f"{intra[1:].sum():.2f})\nZero-bin mass: {zero_mass:.2f}\n"
            f"Clamped prob mass: {clamped:.6f}"
        )
        sub.set_ylabel("Prob")
        sub.set_xlabel("Bins (0 and 1 are centroids)")
    fig.savefig(path, dpi=450)
    plt.close(fig)


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(label: str, samples: list[tuple[float, float]]) -> tuple[float, float]:
    wall = statistics.median(s[0] for s in samples)
    cpu = statistics.median(s[1] for s in samples)
    print(f"{label:<44} {1000 * wall:8.1f} ms wall  {1000 * cpu:8.1f} ms CPU  "
          f"(median of {len(samples)})")
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of our plots over all quantizers")
    parser.add_argument("--seed-plots", type=int, default=0,
                        help="quantizers drawn at the seed's settings (default: all)")
    parser.add_argument("--workers", type=int, default=2, help="workers for the render_many run")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    torch.set_num_threads(THREADS)
    from eqcore.plots.jobs import PlotJob, render_many
    from eqcore.plots.png import save_figure
    from eqcore.plots.render import render_sa_hist

    names, views = sa_views()
    print(f"resnet18 (seeded init), {len(views)} activation quantizers, torch threads = "
          f"{torch.get_num_threads()}, matplotlib {matplotlib.__version__}")
    ours, seed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        save_figure(render_sa_hist(views[0], title="warm-up"), out / "warm-up.png")
        for _ in range(args.rounds):
            for name, view in zip(names, views):
                title = f"Sensitivity analysis - bench - {name}"
                ours.append(timed(lambda: save_figure(render_sa_hist(view, title=title),
                                                      out / f"ours-{name}.png")))
        count = args.seed_plots or len(views)
        for name, view in list(zip(names, views))[:count]:
            seed.append(timed(lambda: seed_settings_plot(view, out / f"seed-{name}.png",
                                                         f"bench - {name}")))
        print("time per SA plot (render + PNG write):")
        our_wall, our_cpu = summary("ours, default 8x6 in @ 100 dpi", ours)
        seed_wall, seed_cpu = summary("seed's settings, 14x9 in @ 450 dpi", seed)
        print(f"ratio seed / ours: {seed_wall / our_wall:.1f}x wall, {seed_cpu / our_cpu:.1f}x CPU")
        sizes = [p.stat().st_size for p in out.glob("ours-*.png")]
        print(f"our PNGs: {statistics.median(sizes) / 1024:.0f} KiB median")

        jobs = [PlotJob(path=out / "many" / f"{n}.png", view=v, title=n, sensitivity=True)
                for n, v in zip(names, views)]
        serial_wall, _ = timed(lambda: render_many(jobs))
        line = f"render_many, {len(jobs)} plots: in-process {1000 * serial_wall / len(jobs):.1f} ms/plot"
        for context in ("spawn", "fork"):
            wall, _ = timed(lambda: render_many(jobs, workers=args.workers, mp_context=context))
            line += f"; {args.workers} {context} workers {1000 * wall / len(jobs):.1f}"
        print(line + " ms/plot (worker start-up included)")

if __name__ == "__main__":
    main()
