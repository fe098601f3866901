"""QTH / SA plots (eqcore.plots): images against baselines, byte stability, files and names.

Image tests return their figure to pytest-mpl (``pytest --mpl`` compares it with
``baselines/mpl``; regenerate with ``pytest --mpl-generate-path=baselines/mpl
tests/test_plots.py``). Without ``--mpl`` they still check what the figure says.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from eqcore.errors import EQError
from eqcore.analysis.grid import GridBins, QuantGrid
from eqcore.analysis.histograms import GradientHistogram, TensorHistogram
from eqcore.analysis.hooks import ActHistogram
from eqcore.plots.api import plot_quant_act_hist, plot_quant_act_SA_hist, plot_quant_weight_hist
from eqcore.plots.boxplots import per_channel_boxplots
from eqcore.plots.jobs import PlotJob, plot_file_name, render_many
from eqcore.plots.png import figure_to_png, save_figure
from eqcore.plots.render import render_act_hist, render_sa_hist, render_weight_hist
from eqcore.plots.style import PLOT_STYLE
from eqcore.plots.view import HistogramView

ROOT = Path(__file__).resolve().parents[1]
image_compare = pytest.mark.mpl_image_compare(
    baseline_dir="../baselines/mpl",
    style=("default", PLOT_STYLE),
    savefig_kwargs={"metadata": {"Software": None}},
)


def activation_data(seed: int = 0) -> tuple[TensorHistogram, GradientHistogram]:
    """A ReLU-like activation (half zeros, a tail past the grid) and gradients on it."""
    gen = torch.Generator().manual_seed(seed)
    grid = GridBins.for_range(0, 255)
    x = torch.relu(torch.randn(32, 48, 48, generator=gen) + 0.2)
    qgrid = QuantGrid.capture(torch.tensor([0.011]), torch.tensor([3.0]), grid)
    hist = TensorHistogram(grid)
    hist.update(x, qgrid.scale, qgrid.zero_point)
    grads = GradientHistogram(grid)
    grads.add_paired(x, torch.randn(x.shape, generator=gen) * torch.exp(-x), qgrid)
    return hist, grads


def weight_data(seed: int = 1) -> tuple[TensorHistogram, GradientHistogram]:
    """A per-channel symmetric int8 weight (channels of different ranges) and its gradients."""
    gen = torch.Generator().manual_seed(seed)
    grid = GridBins.for_range(-128, 127)
    w = torch.randn(48, 16, 3, 3, generator=gen) * torch.linspace(0.2, 2.0, 48).reshape(-1, 1, 1, 1)
    scale = w.abs().amax(dim=(1, 2, 3)) / 127
    qgrid = QuantGrid.capture(scale, torch.zeros(48), grid, ch_axis=0)
    hist = TensorHistogram(grid, ch_axis=0)
    hist.update(w, qgrid.scale, qgrid.zero_point)
    grads = GradientHistogram(grid)
    grads.add_paired(w, torch.randn(w.shape, generator=gen) * w.abs(), qgrid)
    return hist, grads


def texts_of(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]


def pct(share: float) -> str:
    return f"{100 * share:.2f}%"


@image_compare
def test_activation_hist_image():
    hist, _ = activation_data()
    fig = render_act_hist(hist, title="Activation - test - act_0")
    stats = hist.stats()
    texts = texts_of(fig)
    assert "Activation - test - act_0" in texts
    assert any(t.startswith("256-level grid") and "zero point 3" in t for t in texts)
    assert any(f"zero bin {pct(stats.zero_bin)}" in t for t in texts)
    assert any(f"clamped {pct(stats.clamped)}" in t for t in texts)
    assert "activation value" in texts
    return fig


@image_compare
def test_activation_hist_log_scale_image():
    hist, _ = activation_data()
    fig = render_act_hist(hist, title="Activation - log - act_0", log_scale=True)
    labels = texts_of(fig)
    assert "10%" in labels and "1%" in labels  # decades on the y axis
    assert not any("\u2191" in t for t in labels)  # nothing cut off in log scale
    return fig


@image_compare
def test_weight_hist_image():
    hist, _ = weight_data()
    fig = render_weight_hist(hist, title="Weight - test - layer1.0.conv1")
    texts = texts_of(fig)
    assert any("48 channels" in t for t in texts)
    assert any(t.startswith("weight on the integer grid") for t in texts)
    assert "\u2212120" in texts or "\u2212100" in texts  # x axis in grid levels, unicode minus
    return fig


@image_compare
def test_activation_sa_image():
    hist, grads = activation_data()
    fig = render_sa_hist(hist, grads, title="Sensitivity analysis - test - act_0")
    stats = grads.stats(zero_point=hist.zero_point, grid_range=hist.grid_range)
    texts = texts_of(fig)
    assert "|Gradient|: mean intra-bin profile" in texts
    assert any(f"off-centroid {pct(stats.off_centroid)}" in t for t in texts)
    assert "share of |gradient|" in texts
    return fig


@image_compare
def test_weight_sa_image():
    hist, grads = weight_data()
    return render_sa_hist(hist, grads, tensor_kind="Weight",
                          title="Sensitivity analysis - test - layer1.0.conv1")


@image_compare
def test_sa_image_with_seed_inset_positions():
    hist, grads = activation_data()
    fig = render_sa_hist(hist, grads, title="Sensitivity analysis - seed positions",
                         sum_pos_1=[0.18, 0.60, 0.1, 0.1], sum_pos_2=[0.75, 0.43, 0.1, 0.1])
    cards = [a for a in fig.artists if isinstance(a, matplotlib.patches.Rectangle)
             and a.get_facecolor()[:3] == (1.0, 1.0, 1.0)]
    assert len(cards) == 2  # insets over the data sit on white cards
    return fig


@image_compare
def test_sa_image_without_gradients():
    hist, _ = activation_data()
    fig = render_sa_hist(hist, None, title="Sensitivity analysis - no backward")
    assert "no gradients recorded for this tensor" in texts_of(fig)
    return fig


@image_compare
def test_per_channel_boxplots_image(tmp_path):
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(24, 8, 3, 3, generator=gen) * torch.linspace(0.1, 1.0, 24).reshape(-1, 1, 1, 1)
    fig = per_channel_boxplots(weight, title="layer2.0.conv1", CLE=True, file_path=tmp_path)
    assert (tmp_path / "With_CLE" / "layer2.0.conv1.png").is_file()
    assert fig.axes[0].get_title() == "With_CLE, layer2.0.conv1, Per-Output-Channel Weight Boxplots"
    medians = [line for line in fig.axes[0].lines if line.get_color() == "#d95f02"][0]
    expected = torch.quantile(weight.reshape(24, -1).double(), 0.5, dim=1).numpy()
    assert np.allclose(medians.get_ydata()[0::3], expected)
    return fig


def test_boxplots_without_file_path_write_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fig = per_channel_boxplots(torch.ones(4, 2), title="t", CLE=False)
    assert fig.axes and not any(tmp_path.iterdir())
    with pytest.raises(EQError):
        per_channel_boxplots(torch.empty(0), title="t", CLE=False)


def test_same_data_gives_identical_bytes(tmp_path):
    hist, grads = activation_data()
    first = figure_to_png(render_sa_hist(hist, grads, title="t"))
    second = figure_to_png(render_sa_hist(activation_data()[0], activation_data()[1], title="t"))
    assert first == second
    save_figure(render_sa_hist(hist, grads, title="t"), tmp_path / "a.png")
    save_figure(render_sa_hist(hist, grads, title="t"), tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".png"]  # no temp files left
    stream = io.BytesIO()
    assert save_figure(render_sa_hist(hist, grads, title="t"), stream) is stream
    assert stream.getvalue() == first
    info = Image.open(io.BytesIO(first)).info
    assert "Software" not in info and not any(isinstance(v, str) for v in info.values())


def test_cached_texts_look_like_plain_texts_and_do_not_depend_on_the_cache(monkeypatch):
    """The fixed texts are blitted from a cache: same look as drawing them, same bytes cold or warm."""
    from eqcore.plots import texts as _plot_texts

    hist, grads = activation_data()

    def pixels(dpi):
        png = figure_to_png(render_sa_hist(hist, grads, title="t"), dpi=dpi)
        return png, np.asarray(Image.open(io.BytesIO(png))).astype(int)

    warm = {dpi: pixels(dpi) for dpi in (100, 50)}
    monkeypatch.setattr(_plot_texts._CachedTexts, "_tiles", type(_plot_texts._CachedTexts._tiles)())
    assert all(pixels(dpi)[0] == warm[dpi][0] for dpi in (100, 50))

    def draw_plainly(self, renderer):
        for text in self.texts:
            text.draw(renderer)

    monkeypatch.setattr(_plot_texts._CachedTexts, "draw", draw_plainly)
    for dpi in (100, 50):
        png, plain = pixels(dpi)
        assert plain.shape == warm[dpi][1].shape
        assert np.abs(plain - warm[dpi][1]).max() <= 1  # alpha blending may round differently
    assert warm[50][1].shape == (300, 400, 3)


def test_vector_output_draws_the_fixed_texts_as_text():
    hist, grads = activation_data()
    svg = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        render_sa_hist(hist, grads, title="t").savefig(svg, format="svg")
    assert "grid levels" in svg.getvalue() and "share of |gradient|" in svg.getvalue()
    assert "<image" not in svg.getvalue()


def test_redraw_from_stored_arrays_is_byte_identical(tmp_path):
    """What the plugin does: store a histogram as NPZ, rebuild it, redraw the same PNG."""
    hist, grads = weight_data()
    original = figure_to_png(render_sa_hist(hist, grads, tensor_kind="Weight", title="w"))
    np.savez(tmp_path / "h.npz", **HistogramView.of(hist, grads).to_arrays())
    with np.load(tmp_path / "h.npz", allow_pickle=False) as stored:
        view = HistogramView.from_arrays(dict(stored))
    assert figure_to_png(render_sa_hist(view, tensor_kind="Weight", title="w")) == original
    assert np.array_equal(view.counts, hist.counts)
    assert view.grad_stats().clamped == grads.stats(zero_point=hist.zero_point).clamped


def test_view_stats_match_histogram_stats():
    hist, grads = activation_data()
    view = HistogramView.of(hist, grads)
    ours, theirs = view.stats(), hist.stats()
    for name in ("numel", "clamped_below", "clamped_above", "zero_bin", "off_centroid"):
        assert getattr(ours, name) == getattr(theirs, name)
    assert view.grid_range == hist.grid_range and view.value_range == hist.value_range
    with pytest.raises(ValueError, match="bins"):
        HistogramView(grid=hist.grid, counts=np.ones(10), scale=[1.0], zero_point=[0])
    with pytest.raises(TypeError):
        HistogramView.of(np.ones(3))


def rc_snapshot() -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
        return dict(matplotlib.rcParams)


def test_rendering_leaves_matplotlib_state_alone():
    rc = rc_snapshot()
    backend = matplotlib.get_backend()
    figure_to_png(render_act_hist(activation_data()[0]))
    assert matplotlib.get_backend() == backend
    assert rc_snapshot() == rc


def test_imports_stay_light_and_pyplot_free():
    code = (
        "import sys, eqcore\n"
        "assert 'matplotlib' not in sys.modules, 'import eqcore imported matplotlib'\n"
        "from eqcore.plots.render import render_act_hist\n"
        "from eqcore.analysis.grid import GridBins\n"
        "from eqcore.analysis.histograms import TensorHistogram\n"
        "import torch\n"
        "h = TensorHistogram(GridBins.for_range(0, 15))\n"
        "h.update(torch.rand(100), torch.tensor([0.1]), torch.tensor([0.0]))\n"
        "render_act_hist(h)\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'rendering imported pyplot'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def fake_act_histograms(names, *, with_grads: bool):
    """ActHistogram objects as the hooks fill them, with live hook handles on a dummy module."""
    module = torch.nn.Identity()
    forward, backward = ActHistogram(), ActHistogram()
    for i, name in enumerate(names):
        hist, grads = activation_data(seed=i)
        forward.data[name] = hist
        forward.hook_handles[name] = module.register_forward_hook(lambda *a: None)
        if with_grads:
            backward.data[name] = grads
            backward.hook_handles[name] = module.register_forward_hook(lambda *a: None)
    return module, forward, backward


def test_act_sa_files_names_and_reset(tmp_path):
    module, forward, backward = fake_act_histograms(["activation_post_process_1", "stem.act"],
                                                    with_grads=True)
    paths = plot_quant_act_SA_hist(forward, backward, file_path=tmp_path, plot_title="t",
                                   module_name_mapping=lambda n: n.replace(".", "-"))
    folder = tmp_path / "activations" / "sensitivity_analysis"
    assert paths == [folder / "SA-Act-hist-activation_post_process_1.png",
                     folder / "SA-Act-hist-stem-act.png"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths)
    assert forward.data == {} and backward.data == {}
    assert not forward.hook_handles and not module._forward_hooks  # hooks removed


def test_act_hist_files_and_sanitised_names(tmp_path):
    names = ["activation_post_process_0", "../../escape", "a/b\\c:d"]
    _, forward, _ = fake_act_histograms(names, with_grads=False)
    paths = plot_quant_act_hist(forward, tmp_path, "forward only", None, [0.18, 0.6, 0.1, 0.1])
    folder = tmp_path / "activations" / "hists"
    assert [p.name for p in paths] == ["Act-hist-activation_post_process_0.png",
                                       "Act-hist-..-..-escape.png", "Act-hist-a-b-c-d.png"]
    assert all(p.parent == folder and p.is_file() for p in paths)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == \
        sorted(f"activations/hists/{p.name}" for p in paths)
    assert forward.data == {}


def test_names_colliding_after_mapping_get_distinct_files(tmp_path, caplog):
    _, forward, _ = fake_act_histograms(["a.1", "a-1"], with_grads=False)
    paths = plot_quant_act_hist(forward, tmp_path, module_name_mapping=lambda n: n.replace(".", "-"))
    assert [p.name for p in paths] == ["Act-hist-a-1.png", "Act-hist-a-1-2.png"]
    assert "already used" in caplog.text


def test_plot_file_names():
    assert plot_file_name("weight_sa", "layer4.0.conv2", lambda n: n.replace(".", "-")) == \
        "Weight-hist-layer4-0-conv2.png"
    assert plot_file_name("weight", "layer4.0.conv2") == "Weight-hist-layer4.0.conv2.png"
    assert plot_file_name("act", "") == "Act-hist-unnamed.png"
    long = plot_file_name("act_sa", "x" * 1000)
    assert len(long.encode()) <= 210 and long.endswith(".png")
    with pytest.raises(EQError, match="module_name_mapping"):
        plot_file_name("act", "a", lambda n: None)


def test_bad_inputs_get_clear_errors(tmp_path):
    _, forward, backward = fake_act_histograms(["a"], with_grads=True)
    with pytest.raises(EQError, match="sum_pos_1"):
        plot_quant_act_SA_hist(forward, backward, tmp_path, sum_pos_1=[0.1, 0.2])
    backward.data["a"] = forward.data["a"]
    with pytest.raises(EQError, match="GradientHistogram"):
        plot_quant_act_SA_hist(forward, backward, tmp_path)
    assert forward.data  # nothing was reset on failure
    with pytest.raises(EQError, match="workers"):
        render_many([], workers=0)
    empty = ActHistogram()
    assert plot_quant_act_hist(empty, tmp_path) == [] and not any(tmp_path.iterdir())


def test_render_many_matches_in_process(tmp_path):
    hist, grads = activation_data()
    view = HistogramView.of(hist, grads)
    jobs = [PlotJob(path=tmp_path / "serial" / f"{i}.png", view=view, title=str(i),
                    sensitivity=bool(i % 2)) for i in range(4)]
    parallel = [PlotJob(**{**job.__dict__, "path": tmp_path / "parallel" / job.path.name})
                for job in jobs]
    serial_paths = render_many(jobs)
    parallel_paths = render_many(parallel, workers=2)
    assert [p.name for p in parallel_paths] == [p.name for p in serial_paths]
    for a, b in zip(serial_paths, parallel_paths):
        assert a.read_bytes() == b.read_bytes()


@pytest.mark.slow
def test_render_many_with_spawned_workers(tmp_path):
    hist, grads = weight_data()
    job = PlotJob(path=tmp_path / "w.png", view=HistogramView.of(hist, grads), title="w",
                  tensor_kind="Weight", sensitivity=True)
    expected = figure_to_png(job.render())
    (path,) = render_many([job, PlotJob(**{**job.__dict__, "path": tmp_path / "x.png"})],
                          workers=2, mp_context="spawn")[:1]
    assert path.read_bytes() == expected


def tutorial_model() -> torch.nn.Module:
    """resnet18 (seeded init) through the SA tutorial's qconfig loop, prepare and BN folding."""
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
        fx_model = prepare_qat_fx(model, mapping, (torch.randn(1, 3, 224, 224),))
    fx_model.eval()
    return convbn_to_conv(fx_model)


@pytest.mark.slow
def test_sa_tutorial_plotting_cells_write_the_tutorials_files(tmp_path):
    from eqcore.models.samples import find_sample
    from eqcore.models.specs import eval_transform, imagenet_spec
    from eqcore.analysis.hooks import add_activation_forward_hooks
    from eqcore.analysis.sa_hooks import add_sensitivity_analysis_hooks
    from eqcore.quant.modules import EQLearnableFakeQuantize
    from eqcore.quant.toggles import disable_PTQ_observer, enable_fake_quant

    # The tutorial calibrates first (HistogramObserver, seconds); the files do not depend on it.
    fx_model = tutorial_model()
    image = eval_transform(imagenet_spec())(find_sample("grace_hopper").load()).unsqueeze(0)
    fx_model.apply(enable_fake_quant)

    def conditions_met_forward_act_hook(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, EQLearnableFakeQuantize) and "1" in name

    def module_mapping(name: str) -> str:
        return name.replace(".", "-")

    plots = tmp_path / "Histogram_plots"
    fx_model.apply(disable_PTQ_observer)
    act_forward_histograms, act_backward_histograms = add_sensitivity_analysis_hooks(
        fx_model, conditions_met=conditions_met_forward_act_hook, bit_res=8
    )
    fx_model(image).mean().backward()
    plot_quant_act_SA_hist(
        act_forward_histograms, act_backward_histograms, file_path=plots,
        sum_pos_1=[0.18, 0.60, 0.1, 0.1], sum_pos_2=[0.75, 0.43, 0.1, 0.1],
        plot_title="TEST-SA", module_name_mapping=None, bit_res=8,
    )
    assert act_forward_histograms.data == {} and act_backward_histograms.hook_handles == {}
    act_forward_histograms.reset()
    act_backward_histograms.reset()

    act_forward_histograms = add_activation_forward_hooks(fx_model, conditions_met_forward_act_hook)
    with torch.no_grad():
        fx_model(image)
    plot_quant_act_hist(act_forward_histograms, file_path=plots, plot_title="Just forward hists",
                        module_name_mapping=None, sum_pos_1=[0.18, 0.60, 0.1, 0.1])
    plot_quant_weight_hist(fx_model, file_path=plots, plot_title="Just weight hists",
                           module_name_mapping=module_mapping, conditions_met=None)
    for parameter in fx_model.parameters():
        parameter.grad = None
    fx_model(image).mean().backward()
    plot_quant_weight_hist(fx_model, file_path=plots, plot_title="SA weight hists",
                           module_name_mapping=module_mapping, conditions_met=None,
                           sensitivity_analysis=True)

    # The tutorial's hooked modules, and every conv of resnet18 (fc is not quantized there).
    acts = ["activation_post_process_1", *(f"activation_post_process_{i}" for i in range(10, 20)),
            "activation_post_process_21"]
    convs = ["conv1"] + [
        f"layer{layer}.{block}.{conv}"
        for layer in range(1, 5) for block in range(2)
        for conv in (("conv1", "conv2", "downsample.0") if layer > 1 and block == 0 else ("conv1", "conv2"))
    ]
    expected = {f"activations/sensitivity_analysis/SA-Act-hist-{a}.png" for a in acts}
    expected |= {f"activations/hists/Act-hist-{a}.png" for a in acts}
    for folder in ("hists", "sensitivity_analysis"):
        expected |= {f"weights/{folder}/Weight-hist-{c.replace('.', '-')}.png" for c in convs}
    written = {str(p.relative_to(plots)) for p in plots.rglob("*") if p.is_file()}
    assert written == expected
    assert "weights/sensitivity_analysis/Weight-hist-layer4-0-conv2.png" in written
    with Image.open(plots / "weights/sensitivity_analysis/Weight-hist-layer4-0-conv2.png") as png:
        assert png.size == (800, 600)


def test_marker_baselines_exist_for_every_image_test():
    names = [name for name, obj in globals().items()
             if name.startswith("test_") and hasattr(obj, "pytestmark")
             and any(m.name == "mpl_image_compare" for m in obj.pytestmark)]
    missing = [n for n in names if not (ROOT / "baselines" / "mpl" / f"{n}.png").is_file()]
    assert len(names) == 8 and not missing, json.dumps(missing)
