"""QTH/SA hooks, weight histograms and the one-call SA pass on a real FX-prepared resnet18."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from eqcore._torch_ao import QConfig, QConfigMapping, prepare_qat_fx, tq
from eqcore.errors import EQError
from eqcore.prepare.calibrate import calibrate
from eqcore.prepare.quantize import prepare_model
from eqcore.analysis.binning import bin_indices
from eqcore.analysis.hooks import ActHistogram, activation_quantizers, add_activation_forward_hooks
from eqcore.analysis.sa_hooks import add_sensitivity_analysis_hooks
from eqcore.analysis.sa_run import run_sensitivity_analysis
from eqcore.analysis.weights import weight_histograms
import eqcore.analysis.sa_hooks as sa_hooks_module
from eqcore.analysis.gradient_binning import GradientBinner
from eqcore.quant.modules import EQFakeQuantize, EQLearnableFakeQuantize
from eqcore.quant.toggles import disable_PTQ_observer
from fq_kernels import kernel_path


def seed_qconfig_mapping(model: nn.Module) -> QConfigMapping:
    """The SA tutorial's loop: per-channel symmetric int8 weights, per-tensor uint8 activations."""
    act = EQLearnableFakeQuantize.with_args(
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
            weight = EQLearnableFakeQuantize.with_args(
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
    return mapping


def prepare(model: nn.Module, example: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return prepare_qat_fx(model, seed_qconfig_mapping(model), (example,))


@pytest.fixture(scope="module")
def fx_model() -> nn.Module:
    """resnet18 (seeded init) prepared with the w8a8 recipe (BN folded) and calibrated."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    prepared = prepare_model(model, "w8a8", (torch.randn(1, 3, 64, 64),))
    calibrate(prepared, [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))])
    return prepared


def three_batches() -> list[torch.Tensor]:
    """Batches of different content (and sizes): normal, heavy-tailed and a ramp."""
    generator = torch.Generator().manual_seed(2)
    normal = torch.randn(2, 3, 64, 64, generator=generator)
    heavy = torch.randn(1, 3, 64, 64, generator=generator) ** 3 * 2
    ramp = torch.linspace(-2, 3, 3 * 64 * 64).reshape(1, 3, 64, 64).repeat(3, 1, 1, 1)
    # Inputs that require grad, so that the input quantizer gets gradients too.
    return [batch.requires_grad_(True) for batch in (normal, heavy, ramp)]


class Recorder:
    """Test-side ground truth: every call's input and the gradient reaching its output."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.grads: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.handles = [
            model.get_submodule(name).register_forward_hook(self._hook(name)) for name in names
        ]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return
            self.inputs[name].append(inputs[0].detach().clone())
            slot = len(self.grads[name])
            self.grads[name].append(None)

            def on_grad(grad):
                self.grads[name][slot] = grad.detach().clone()

            output.register_hook(on_grad)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_counts_and_binned_grads_add_up_over_three_different_batches(fx_model: nn.Module) -> None:
    forward, backward = add_sensitivity_analysis_hooks(fx_model)
    names = list(forward.hook_handles)
    assert len(names) == len(activation_quantizers(fx_model)) > 20
    recorder = Recorder(fx_model, names)
    try:
        for batch in three_batches():
            fx_model(batch).mean().backward()
    finally:
        recorder.remove()
        forward.remove_hooks()
        backward.remove_hooks()
    fx_model.zero_grad(set_to_none=True)
    assert forward.errors == {} and backward.errors == {}
    for name in names:
        hist, grads = forward.data[name], backward.data[name]
        module = fx_model.get_submodule(name)
        seen = sum(x.numel() for x in recorder.inputs[name])
        assert hist.numel == seen and hist.calls == 3
        assert hist.counts.sum() + hist.nan_count == seen
        grad_sum = sum(g.double().sum().item() for g in recorder.grads[name])
        grad_abs = sum(g.double().abs().sum().item() for g in recorder.grads[name])
        binned_sum = grads.binned_grads.sum() + grads.nan_grad_sum
        assert binned_sum == pytest.approx(grad_sum, rel=1e-9, abs=1e-12 * grad_abs)
        # Per bin, too: exactly what each call's own indices give.
        counts = np.zeros(hist.grid.n_bins + 1, dtype=np.int64)
        sums = np.zeros(hist.grid.n_bins + 1)
        for x, g in zip(recorder.inputs[name], recorder.grads[name]):
            index = bin_indices(x, module.scale, module.zero_point, hist.grid).reshape(-1).long()
            counts += torch.bincount(index, minlength=hist.grid.n_bins + 1).numpy()
            sums += torch.bincount(index, weights=g.reshape(-1).double(), minlength=hist.grid.n_bins + 1).numpy()
        np.testing.assert_array_equal(hist.counts, counts[:-1])
        np.testing.assert_allclose(grads.binned_grads, sums[:-1], rtol=1e-9, atol=1e-12 * grad_abs)


def seed_style_pairing(model: nn.Module, names: list[str]) -> tuple[dict, list]:
    """The seed's SA hooks: keep the last forward's indices; bin each backward with them,
    overwriting the stored result (what EasyQuant's tutorial code does)."""
    last_index: dict[str, torch.Tensor] = {}
    binned: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def forward_hook(module, inputs, output, name=name):
            grid = _GRIDS[name]
            last_index[name] = bin_indices(inputs[0], module.scale, module.zero_point, grid).reshape(-1).long()

        def backward_hook(module, grad_input, grad_output, name=name):
            grid = _GRIDS[name]
            index = last_index[name]
            grad = grad_output[0].reshape(-1).double()
            n = min(index.numel(), grad.numel())
            binned[name] = torch.bincount(index[:n], weights=grad[:n], minlength=grid.n_bins + 1)

        handles.append(module.register_forward_hook(forward_hook))
        handles.append(module.register_full_backward_hook(backward_hook))
    return binned, handles


_GRIDS: dict = {}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_seed_last_batch_pairing_fails_the_sum_check(fx_model: nn.Module) -> None:
    forward, backward = add_sensitivity_analysis_hooks(fx_model)
    names = list(forward.hook_handles)
    recorder = Recorder(fx_model, names)
    with torch.no_grad():
        fx_model(torch.randn(1, 3, 64, 64))
    _GRIDS.update({name: forward.data[name].grid for name in names})
    forward.reset()
    backward.reset()
    forward, backward = add_sensitivity_analysis_hooks(fx_model)
    seed_binned, handles = seed_style_pairing(fx_model, names)
    try:
        for batch in three_batches():
            fx_model(batch).mean().backward()
    finally:
        for handle in handles:
            handle.remove()
        recorder.remove()
        forward.remove_hooks()
        backward.remove_hooks()
    fx_model.zero_grad(set_to_none=True)
    seed_failures = 0
    for name in names:
        grads = recorder.grads[name][-3:]
        grad_sum = sum(g.double().sum().item() for g in grads)
        tolerance = 1e-9 * sum(g.double().abs().sum().item() for g in grads)
        ours = backward.data[name].binned_grads.sum() + backward.data[name].nan_grad_sum
        assert abs(ours - grad_sum) <= tolerance
        seed = seed_binned[name].sum().item()
        seed_failures += abs(seed - grad_sum) > tolerance
    assert seed_failures == len(names)


def test_module_called_twice_per_forward_pairs_each_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant = EQFakeQuantize(observer=tq.MinMaxObserver, quant_min=0, quant_max=255)
            self.quant.scale.fill_(0.05)
            self.quant.zero_point.fill_(20)
            self.quant.enable_observer(False)

        def forward(self, x):
            return (self.quant(x) * 3).sum() + (self.quant(x * 2 - 1) ** 2).sum()

    model = Twice()
    forward, backward = add_sensitivity_analysis_hooks(model)
    assert list(forward.hook_handles) == ["quant"]
    inputs = [torch.randn(4, 100), torch.rand(7, 10)]
    for x in inputs:
        model(x.clone().requires_grad_(True)).backward()
    hist, grads = forward.data["quant"], backward.data["quant"]
    assert hist.calls == 4 and hist.numel == 2 * (400 + 70)
    expected = np.zeros(hist.grid.n_bins + 1)
    q = model.quant
    for x in inputs:
        for value in (x, x * 2 - 1):
            v = value.clone().requires_grad_(True)
            y = torch.fake_quantize_per_tensor_affine(v, 0.05, 20, 0, 255)
            out = (y * 3).sum() if value is x else (y**2).sum()
            (grad,) = torch.autograd.grad(out, y)
            index = bin_indices(value, q.scale, q.zero_point, hist.grid).reshape(-1).long()
            expected += torch.bincount(index, weights=grad.reshape(-1).double(), minlength=len(expected)).numpy()
    np.testing.assert_allclose(grads.binned_grads, expected[:-1], rtol=1e-9, atol=1e-9)
    forward.reset()
    backward.reset()


def test_pass_through_quantizer_sees_only_its_own_gradient() -> None:
    quant = EQFakeQuantize(observer=tq.MinMaxObserver, quant_min=0, quant_max=255)
    quant.disable_fake_quant()
    quant.enable_observer(False)
    forward, backward = add_sensitivity_analysis_hooks(quant)
    x = torch.randn(50, requires_grad=True)
    y = quant(x)
    (y.sum() * 2 + (x * 5).sum()).backward()
    assert backward.data[""].binned_grads.sum() == pytest.approx(100.0)
    forward.reset()
    backward.reset()


def test_counts_without_a_backward_are_kept(fx_model: nn.Module) -> None:
    forward, backward = add_sensitivity_analysis_hooks(fx_model)
    name = next(iter(forward.hook_handles))
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    per_call = x.numel()
    fx_model(x)  # graph built, never backpropagated, dropped
    out = fx_model(x)
    assert forward.data[name].numel == 2 * per_call  # read before the backward
    out.mean().backward()
    assert forward.data[name].numel == 2 * per_call  # the backward does not count it again
    assert forward.data[name].calls == 2
    assert backward.data[name].calls == 1
    assert backward.data[name].numel == per_call
    forward.reset()
    backward.reset()
    fx_model.zero_grad(set_to_none=True)


def numpy_weight_bins(weight: np.ndarray, scale: np.ndarray, grid) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric bins in numpy: (index per element, distance of e to a sub-bin edge)."""
    inv = (np.float32(1) / scale.astype(np.float32)).reshape(-1, *[1] * (weight.ndim - 1))
    u = weight.astype(np.float32) * inv
    r = np.rint(u)
    e = (u - r).astype(np.float64)
    B = grid.bins_per_qbin
    sub = np.clip(np.floor((e + 0.5) * B), 0, B - 1)
    index = np.clip((r - grid.first_qbin) * B + sub, 0, grid.n_bins - 1).astype(np.int64)
    edge_distance = np.abs((e + 0.5) * B - np.round((e + 0.5) * B)) / B
    return index.reshape(-1), edge_distance.reshape(-1)


def test_per_channel_weight_histogram_matches_numpy(fx_model: nn.Module) -> None:
    results = weight_histograms(fx_model, conditions_met=lambda m, name: name == "layer2.0.conv1")
    assert list(results) == ["layer2.0.conv1"]
    result = results["layer2.0.conv1"]
    conv = fx_model.get_submodule("layer2.0.conv1")
    assert result.histogram.per_channel and result.gradients is None
    index, edge_distance = numpy_weight_bins(
        conv.weight.detach().numpy(), conv.weight_fake_quant.scale.detach().numpy(), result.histogram.grid
    )
    expected = np.bincount(index, minlength=result.histogram.grid.n_bins)
    grid = result.histogram.grid
    per_qbin = lambda counts: counts.reshape(-1, grid.bins_per_qbin).sum(1)  # noqa: E731
    np.testing.assert_array_equal(per_qbin(result.hist), per_qbin(expected))
    # Inside a quantization bin the position is resolved to ~1e-3 of a bin: only elements that
    # close to a sub-bin edge may sit one sub-bin over.
    near_edge = int((edge_distance < 2e-3).sum())
    assert np.abs(result.hist - expected).sum() <= 2 * near_edge
    np.testing.assert_array_equal(result.bin_edges, grid.edges)
    assert result.stats.numel == conv.weight.numel()


def preprocessed_image() -> torch.Tensor:
    from matplotlib import cbook
    from PIL import Image
    from torchvision import transforms

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    preprocess = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    return preprocess(Image.open(path).convert("RGB")).unsqueeze(0)


def test_sa_tutorial_steps(fx_model: nn.Module) -> None:
    image = preprocessed_image()

    def conditions_met_forward_act_hook(module: nn.Module, name: str) -> bool:
        return isinstance(module, EQLearnableFakeQuantize) and "1" in name

    fx_model.apply(disable_PTQ_observer)
    act_forward_histograms, act_backward_histograms = add_sensitivity_analysis_hooks(
        fx_model, conditions_met=conditions_met_forward_act_hook, bit_res=8
    )
    hooked = list(act_forward_histograms.hook_handles)
    assert hooked and all("1" in name and "weight_fake_quant" not in name for name in hooked)
    assert act_forward_histograms.data == {} and isinstance(act_backward_histograms, ActHistogram)

    output = fx_model(image)
    output.mean().backward()
    assert set(act_forward_histograms.data) == set(hooked) == set(act_backward_histograms.data)
    for name in hooked:
        entry = act_forward_histograms.data[name]
        assert entry.hist.sum() == entry.numel > 0
        assert len(entry.bin_edges) == len(entry.hist) + 1
        assert act_backward_histograms.data[name].binned_grads.shape == entry.hist.shape

    act_forward_histograms.reset()
    act_backward_histograms.reset()
    assert act_forward_histograms.data == {} and act_forward_histograms.hook_handles == {}
    assert all(not m._forward_hooks for m in fx_model.modules())

    act_forward_histograms = add_activation_forward_hooks(fx_model, conditions_met_forward_act_hook)
    with torch.no_grad():
        fx_model(image)
    assert set(act_forward_histograms.data) == set(hooked)
    act_forward_histograms.reset()

    without_sa = weight_histograms(fx_model, conditions_met=None)
    assert "layer4.0.conv2" in without_sa and without_sa["layer4.0.conv2"].binned_grads is None
    torch.optim.Adam(fx_model.parameters(), lr=1).zero_grad()
    assert all(p.grad is None for p in fx_model.parameters())
    with pytest.raises(EQError, match="run a backward pass first"):
        weight_histograms(fx_model, sensitivity_analysis=True)
    fx_model(image).mean().backward()
    with_sa = weight_histograms(fx_model, conditions_met=None, sensitivity_analysis=True)
    entry = with_sa["layer4.0.conv2"]
    weight_grad = fx_model.get_submodule("layer4.0.conv2").weight.grad
    assert entry.binned_grads.sum() == pytest.approx(weight_grad.double().sum().item(), rel=1e-9, abs=1e-15)
    assert entry.score > 0
    fx_model.zero_grad(set_to_none=True)


def explode(x: torch.Tensor) -> torch.Tensor:
    """Turns part of its input into NaN (log of a negative) and inf (division by zero)."""
    return torch.where(x > 2.5, x / 0.0, torch.where(x > 1.0, torch.log(-x), x))


torch.fx.wrap("explode")


class Explode(nn.Module):
    def forward(self, x):
        return explode(x)


def test_nonfinite_module_is_reported_by_name() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), Explode(), nn.Conv2d(4, 2, 3)).eval()
    prepared = prepare(model, torch.randn(1, 3, 16, 16))
    prepared.apply(disable_PTQ_observer)
    batches = [torch.randn(2, 3, 16, 16) * 3 for _ in range(2)]
    result = run_sensitivity_analysis(prepared, batches, batches=2)
    assert result.errors == {}
    fed_nonfinite = [
        name for name, sa in result.activations.items() if sa.stats.nan_count and sa.stats.inf_count
    ]
    assert fed_nonfinite and fed_nonfinite[0] in result.nonfinite_modules
    first = result.activations[fed_nonfinite[0]]
    assert first.producer == "explode"
    assert first.histogram.numel == first.stats.numel == 2 * 2 * 4 * 14 * 14
    assert math.isfinite(first.score)


def test_run_sensitivity_analysis_restores_the_model(fx_model: nn.Module) -> None:
    fx_model.train()
    fx_model.layer1.eval()
    conv1 = fx_model.get_submodule("conv1")
    conv1.weight.requires_grad_(False)
    marker = torch.full_like(fx_model.fc.weight, 7.0)
    fx_model.fc.weight.grad = marker
    quantizer = fx_model.get_submodule("activation_post_process_3")
    quantizer.toggle_observer_update(True)
    modes = {name: m.training for name, m in fx_model.named_modules()}
    scale_before = quantizer.scale.detach().clone()
    try:
        result = run_sensitivity_analysis(fx_model, three_batches(), batches=3, weights=True)
    finally:
        quantizer.toggle_observer_update(False)
    assert {name: m.training for name, m in fx_model.named_modules()} == modes
    assert not conv1.weight.requires_grad and conv1.weight.grad is None
    assert fx_model.fc.weight.grad is marker
    assert torch.equal(quantizer.scale.detach(), scale_before)
    assert all(not m._forward_hooks for m in fx_model.modules())
    assert result.batches == 3 and result.errors == {}
    assert set(result.activations) == {name for name, _ in activation_quantizers(fx_model)}
    assert all(sa.score >= 0 and sa.histogram.calls == 3 for sa in result.activations.values())
    assert sum(sa.score for sa in result.activations.values()) > 0
    assert result.weights["conv1"].gradients is not None and result.weights["conv1"].score > 0
    assert result.activations["activation_post_process_1"].producer == "conv1"
    fx_model.eval()
    conv1.weight.requires_grad_(True)
    fx_model.fc.weight.grad = None


def test_sa_score_matches_direct_computation(fx_model: nn.Module) -> None:
    batch = three_batches()[0]
    names = [name for name, _ in activation_quantizers(fx_model)]
    recorder = Recorder(fx_model, names)
    try:
        result = run_sensitivity_analysis(fx_model, [batch], weights=False)
        # The recorder saw the same forward and backward.
    finally:
        recorder.remove()
    for name in names[:6]:
        module = fx_model.get_submodule(name)
        x, g = recorder.inputs[name][0], recorder.grads[name][0]
        y = module(x).detach()
        expected = ((y.double() - x.double()) * g.double()).pow(2).sum().item()
        assert result.activations[name].score == pytest.approx(expected, rel=1e-3, abs=1e-30)


def sa_results(model: nn.Module) -> dict[str, tuple]:
    """Counts, binned gradients and score of every activation quantizer over three batches."""
    result = run_sensitivity_analysis(model, three_batches(), batches=3, weights=False)
    assert result.errors == {}, result.errors
    return {
        name: (sa.histogram.counts.copy(), sa.gradients.binned_grads.copy(), sa.score)
        for name, sa in result.activations.items()
    }


def assert_same_results(got: dict[str, tuple], expected: dict[str, tuple]) -> None:
    assert got.keys() == expected.keys()
    for name, (counts, grads, score) in expected.items():
        np.testing.assert_array_equal(got[name][0], counts, err_msg=name)
        np.testing.assert_array_equal(got[name][1], grads, err_msg=name)
        assert got[name][2] == score, name


@pytest.fixture
def tensor_hook_results(fx_model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple]:
    """The SA results with every gradient binned by the tensor hook on the quantizer's output."""
    with monkeypatch.context() as patch:
        patch.setattr(sa_hooks_module, "observe_backward", lambda output, observer: False)
        return sa_results(fx_model)


def test_sa_inside_eqcore_backward_bins_bit_for_bit_as_the_tensor_hook(
    fx_model: nn.Module, tensor_hook_results: dict[str, tuple], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On eqcore's quantizers the SA gradient pass runs inside the quantizer's backward, on the
    u and round(u) it computes: counts, gradient sums and scores are the tensor hook's, bit for bit."""
    fed: list[bool] = []
    feed = GradientBinner.feed
    # A binner fed by the backward leases its buffers; the standalone one borrows bin_gradient's.
    monkeypatch.setattr(
        GradientBinner, "feed", lambda self, *args, **kwargs: (fed.append(self.lease is not None), feed(self, *args, **kwargs))
    )
    assert_same_results(sa_results(fx_model), tensor_hook_results)
    quantizers = len(activation_quantizers(fx_model))
    assert all(fed) and len(fed) >= 3 * quantizers  # every quantizer, every batch, inside the backward


@pytest.mark.parametrize("cls", [EQLearnableFakeQuantize, EQFakeQuantize])
@pytest.mark.parametrize("score", [False, True])
def test_sa_hooks_leave_every_gradient_of_the_pass_unchanged(cls, score: bool) -> None:  # noqa: ANN001
    """Binning inside the quantizer's backward must not touch what that backward goes on with:
    dX, dS and dZ of a QAT step are bit for bit those of the same step without hooks."""
    torch.manual_seed(4)
    kwargs = dict(observer=tq.MinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    model = nn.Sequential(cls(**kwargs), nn.Linear(256, 64), cls(**kwargs))
    x = torch.randn(1200, 256) * 2  # 1.2 MiB: several of the backward's chunks when CHUNK is small
    model(x)
    for quantizer in (model[0], model[2]):
        if cls is EQLearnableFakeQuantize:
            quantizer.enable_param_learning()
        else:
            quantizer.enable_observer(False)
    weights = torch.linspace(-1, 1, 1200 * 64).reshape(1200, 64)

    def step(hooked: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        if hooked:
            forward, backward = add_sensitivity_analysis_hooks(model, score=score)
        xi = x.clone().requires_grad_(True)
        (model(xi) * weights).sum().backward()
        if hooked:
            assert forward.errors == {} and backward.errors == {} and backward.data
            forward.reset()
            backward.reset()
        return [xi.grad] + [p.grad for p in model.parameters() if p.grad is not None]

    with kernel_path("host", chunk=1 << 16):  # the tensors span several chunks
        plain, hooked = step(False), step(True)
    assert len(plain) == len(hooked) >= 3
    for a, b in zip(plain, hooked):
        assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["no chunks offered", "binner fails", "grid resampled"])
def test_sa_falls_back_to_binning_from_x(
    fx_model: nn.Module, tensor_hook_results: dict[str, tuple], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Where the backward offers no chunks (as on a GPU), or binning them fails (the failure is
    recorded), the gradient is binned from x and dY instead: the same results."""
    if how == "no chunks offered":
        with kernel_path("device"):
            assert_same_results(sa_results(fx_model), tensor_hook_results)
    elif how == "binner fails":
        feed = GradientBinner.feed

        def broken(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if self.lease is not None:  # a binner fed by the backward (the standalone one borrows)
                raise RuntimeError("binner broke")
            return feed(self, *args, **kwargs)

        monkeypatch.setattr(GradientBinner, "feed", broken)
        result = run_sensitivity_analysis(fx_model, three_batches(), batches=3, weights=False)
        assert result.errors and all("binner broke" in message for message in result.errors.values())
        got = {name: (sa.histogram.counts, sa.gradients.binned_grads, sa.score) for name, sa in result.activations.items()}
        assert_same_results(got, tensor_hook_results)
    else:  # a histogram grid other than the quantizer's: its u is not the backward's
        forward, backward = add_sensitivity_analysis_hooks(fx_model, bit_res=4)
        try:
            fx_model(three_batches()[0]).mean().backward()
        finally:
            forward.remove_hooks()
            backward.remove_hooks()
        fx_model.zero_grad(set_to_none=True)
        assert forward.errors == {} and backward.errors == {}
        for name, grads in backward.data.items():
            hist = forward.data[name]
            assert hist.numel == grads.numel and hist.counts.sum() + hist.nan_count == hist.numel


def test_bad_inputs_get_clear_errors(fx_model: nn.Module) -> None:
    with pytest.raises(EQError, match="no batches"):
        run_sensitivity_analysis(fx_model, [])
    with pytest.raises(EQError, match="batches must be at least 1"):
        run_sensitivity_analysis(fx_model, [torch.randn(1, 3, 64, 64)], batches=0)
    with pytest.raises(EQError, match="loss_fn"):
        run_sensitivity_analysis(TupleOutput(), [torch.randn(2, 3)], weights=False)
    losses = []
    result = run_sensitivity_analysis(
        TupleOutput(),
        [(torch.randn(2, 3), torch.ones(2))],
        loss_fn=lambda output, target: losses.append(target) or (output[0] * target[:, None]).sum(),
        weights=False,
    )
    assert result.batches == 1 and len(losses) == 1
    assert all(not m._forward_hooks for m in fx_model.modules())


class TupleOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x), x
