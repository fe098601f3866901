"""Percentile, MSE and KL observers on data with known statistics, computed independently with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eqcore._torch_ao import tq
from eqcore.quant.modules import EQLearnableFakeQuantize
from eqcore.quant.observers import KLObserver, MSEObserver, PercentileObserver

OBSERVERS = (PercentileObserver, MSEObserver, KLObserver)


def sample(kind: str, n: int = 100_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal+outliers":
        outliers = np.array([500.0, -400.0, 800.0, 650.0, -700.0] * 4)
        data = np.concatenate([rng.standard_normal(n), outliers])
    elif kind == "normal+mild-outliers":
        data = np.concatenate([rng.standard_normal(n), [40.0, -35.0, 50.0]])
    elif kind == "student-t3":
        data = rng.standard_t(3, n)
    elif kind == "uniform":
        data = rng.uniform(-1.0, 3.0, n)
    elif kind == "normal":
        data = rng.standard_normal(n)
    elif kind == "relu-normal":
        data = np.maximum(rng.standard_normal(n), 0.0)
    else:
        raise AssertionError(kind)
    rng.shuffle(data)
    return data.astype(np.float32)


def observed_range(observer) -> tuple[float, float, float]:  # noqa: ANN001
    """(lo, hi, scale) of the grid the observer's qparams describe."""
    scale, zero_point = observer.calculate_qparams()
    s, z = float(scale), int(zero_point)
    return s * (observer.quant_min - z), s * (observer.quant_max - z), s


def true_mse(x: torch.Tensor, observer) -> float:  # noqa: ANN001
    """The fake-quantization error on the data itself (no histogram), with torch's kernel."""
    scale, zero_point = observer.calculate_qparams()
    y = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), observer.quant_min, observer.quant_max)
    return float((y.double() - x.double()).pow(2).mean())


def bin_width(observer) -> float:  # noqa: ANN001
    return 2 * float(observer.hist_range) / observer.bins


def test_percentile_clips_outliers_near_the_numpy_quantile() -> None:
    data = sample("normal+outliers")
    observer = PercentileObserver(percentile=99.9)
    for chunk in np.array_split(data, 4):  # the range grows across batches
        observer(torch.from_numpy(chunk))
    lo, hi, scale = observed_range(observer)
    want_lo, want_hi = np.percentile(data, [0.1, 99.9])
    tol = bin_width(observer) + scale  # histogram resolution, plus the integer zero point
    assert abs(hi - want_hi) <= tol, (hi, want_hi, tol)
    assert abs(lo - want_lo) <= tol, (lo, want_lo, tol)
    assert hi < 10 and lo > -10  # the outliers (|x| >= 400) are clipped


def test_percentile_nonnegative_data_keeps_zero() -> None:
    data = sample("relu-normal")
    observer = PercentileObserver(percentile=99.0)
    observer(torch.from_numpy(data))
    lo, hi, scale = observed_range(observer)
    assert lo == 0.0 and int(observer.calculate_qparams()[1]) == 0
    assert abs(hi - np.percentile(data, 99.0)) <= bin_width(observer) + scale


def test_percentile_100_is_min_max() -> None:
    x = torch.from_numpy(sample("normal+mild-outliers"))
    observer, minmax = PercentileObserver(percentile=100.0), tq.MinMaxObserver()
    observer(x)
    minmax(x)
    ours, theirs = observer.calculate_qparams(), minmax.calculate_qparams()
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@pytest.mark.parametrize("kind", ["student-t3", "normal+mild-outliers"])
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-128, quant_max=127)],
)
def test_mse_observer_beats_min_max_on_outlier_heavy_data(kind: str, kwargs: dict) -> None:
    x = torch.from_numpy(sample(kind))
    mse, minmax = MSEObserver(**kwargs), tq.MinMaxObserver(**kwargs)
    mse(x)
    minmax(x)
    ours, baseline = true_mse(x, mse), true_mse(x, minmax)
    assert ours < 0.95 * baseline, (ours, baseline)
    lo, hi, _ = observed_range(mse)
    assert max(-lo, hi) < float(x.abs().max())  # it clipped


def test_mse_observer_not_worse_than_min_max_on_uniform_data() -> None:
    x = torch.from_numpy(sample("uniform"))
    mse, minmax = MSEObserver(), tq.MinMaxObserver()
    mse(x)
    minmax(x)
    assert true_mse(x, mse) <= 1.02 * true_mse(x, minmax)


def kl_threshold(observer) -> float:  # noqa: ANN001
    lo, hi, _ = observed_range(observer)
    return max(abs(lo), abs(hi))


@pytest.mark.parametrize("kind", ["normal", "normal+mild-outliers"])
def test_kl_threshold_between_bulk_and_max(kind: str) -> None:
    """Entropy calibration clips the tail of a normal distribution, not its bulk.

    On N(0, 1) (with or without a few outliers), an 8-bit KL threshold lies above the 99th
    percentile of |x| (clipping at most 1% of the data) and below the largest |x|.
    """
    data = sample(kind)
    observer = KLObserver()
    observer(torch.from_numpy(data))
    threshold = kl_threshold(observer)
    bulk = float(np.percentile(np.abs(data), 99.0))
    assert bulk < threshold < float(np.abs(data).max()), (
        f"KL threshold {threshold:.4f} not in (p99 |x| = {bulk:.4f}, max |x| = {float(np.abs(data).max())})"
    )


def test_kl_threshold_does_not_depend_on_histogram_resolution() -> None:
    """The threshold is a property of the data: doubling the histogram's bins must not halve it."""
    x = torch.from_numpy(sample("normal"))
    thresholds = []
    for bins in (1024, 2048, 4096):
        observer = KLObserver(bins=bins)
        observer(x)
        thresholds.append(kl_threshold(observer))
    assert max(thresholds) <= 1.15 * min(thresholds), f"thresholds for 1024/2048/4096 bins: {thresholds}"


@pytest.mark.parametrize("observer_cls", OBSERVERS)
def test_usable_inside_eq_learnable_fake_quantize(observer_cls) -> None:  # noqa: ANN001
    x = torch.from_numpy(sample("normal+mild-outliers", n=20_000))
    factory = EQLearnableFakeQuantize.with_args(
        observer=observer_cls.with_args(bins=1024), quant_min=0, quant_max=255, dtype=torch.quint8,
    )
    module = factory()
    assert isinstance(module.activation_post_process, observer_cls)
    assert module.activation_post_process.bins == 1024
    y = module(x)
    scale, zero_point = module.activation_post_process.calculate_qparams()
    assert torch.equal(module.scale.detach(), scale.reshape(1))
    assert torch.equal(module.calculate_qparams()[1], zero_point.reshape(1))
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), 0, 255))
    # Observer keyword arguments pass straight through the quantizer too.
    direct = EQLearnableFakeQuantize(observer=observer_cls, quant_min=-8, quant_max=7, dtype=torch.qint8)
    assert direct.activation_post_process.quant_min == -8
    direct(x)
    assert direct.calculate_qparams()[0].shape == (1,)


@pytest.mark.parametrize("observer_cls", OBSERVERS)
def test_with_args_and_calculate_qparams(observer_cls) -> None:  # noqa: ANN001
    observer = observer_cls.with_args(quant_min=0, quant_max=15)()
    observer(torch.linspace(-2.0, 6.0, 1001))
    scale, zero_point = observer.calculate_qparams()
    assert scale.numel() == 1 and zero_point.numel() == 1
    assert 0 <= int(zero_point) <= 15 and float(scale) > 0
    lo, hi, _ = observed_range(observer)
    # Within the data's magnitude (KL makes signed ranges symmetric, [-T, T]).
    assert -6.0 - float(scale) <= lo <= 0.0 < hi <= 6.0 + float(scale)


@pytest.mark.parametrize("observer_cls", OBSERVERS)
def test_range_growth_is_exact(observer_cls) -> None:  # noqa: ANN001
    rng = np.random.default_rng(1)
    observer = observer_cls(bins=256)
    first = torch.from_numpy(rng.uniform(-1.0, 1.0, 5000).astype(np.float32))
    observer(first)
    range0 = float(observer.hist_range)
    before = observer.histogram.clone()
    assert float(before.sum()) == first.numel()
    # Growth by 8x: every 8 old bins merge exactly into one new bin in the middle.
    second = torch.from_numpy(rng.uniform(-7.5, 7.5, 3000).astype(np.float32))
    observer(second)
    range1 = float(observer.hist_range)
    assert range1 == 8 * range0
    folded = before.reshape(-1, 8).sum(1)
    expected = torch.zeros_like(before)
    start = (observer.bins - folded.numel()) // 2
    expected[start : start + folded.numel()] = folded
    expected += torch.histc(second, bins=observer.bins, min=-range1, max=range1).double()
    assert torch.equal(observer.histogram, expected)
    np_counts, _ = np.histogram(np.concatenate([first.numpy(), second.numpy()]), bins=observer.bins, range=(-range1, range1))
    assert np.abs(observer.histogram.numpy() - np_counts).sum() <= 4  # only float edge cases may differ
    # Growth beyond the bin count: everything old collapses onto the two centre bins.
    observer(torch.tensor([1e6, -3.0]))
    assert float(observer.histogram.sum()) == first.numel() + second.numel() + 2
    assert float(observer.min_val) == float(torch.cat([first, second]).min())
    assert float(observer.max_val) == 1e6


@pytest.mark.parametrize("observer_cls", OBSERVERS)
def test_nan_and_inf_are_ignored(observer_cls) -> None:  # noqa: ANN001
    rng = np.random.default_rng(2)
    finite = torch.from_numpy(rng.normal(size=4000).astype(np.float32))
    dirty = finite.clone()
    dirty[::97] = float("nan")
    dirty[5::101] = float("inf")
    dirty[7::103] = -float("inf")
    kept = dirty[torch.isfinite(dirty)]
    clean_observer, dirty_observer = observer_cls(), observer_cls()
    clean_observer(kept)
    dirty_observer(dirty)
    dirty_observer(torch.full((10,), float("nan")))  # all non-finite: no change
    dirty_observer(torch.empty(0))
    assert float(dirty_observer.histogram.sum()) == kept.numel()
    assert torch.equal(dirty_observer.histogram, clean_observer.histogram)
    assert float(dirty_observer.min_val) == float(kept.min()) and float(dirty_observer.max_val) == float(kept.max())
    ours, clean = dirty_observer.calculate_qparams(), clean_observer.calculate_qparams()
    assert torch.equal(ours[0], clean[0]) and torch.equal(ours[1], clean[1])
    assert bool(torch.isfinite(ours[0]).all())


@pytest.mark.parametrize("observer_cls", OBSERVERS)
@pytest.mark.parametrize("qscheme", [torch.per_channel_affine, torch.per_channel_symmetric])
def test_per_channel_qscheme_raises(observer_cls, qscheme) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="per-tensor"):
        observer_cls(qscheme=qscheme)
    with pytest.raises(ValueError, match="per-tensor"):
        EQLearnableFakeQuantize(observer=observer_cls, qscheme=qscheme, dtype=torch.qint8, quant_min=-128, quant_max=127)


def test_bad_observer_arguments_raise() -> None:
    for bins in (100, 8, 1000):
        with pytest.raises(ValueError, match="bins"):
            MSEObserver(bins=bins)
    for percentile in (50.0, 100.5, 10.0):
        with pytest.raises(ValueError, match="percentile"):
            PercentileObserver(percentile=percentile)
    with pytest.raises(ValueError, match="candidates"):
        MSEObserver(candidates=1)


@pytest.mark.parametrize("observer_cls", OBSERVERS)
def test_reset_clears_the_histogram(observer_cls) -> None:  # noqa: ANN001
    observer = observer_cls()
    observer(torch.linspace(-5.0, 5.0, 101))
    observer.reset_min_max_vals()
    assert float(observer.histogram.sum()) == 0 and float(observer.hist_range) == 0
    observer(torch.linspace(0.0, 1.0, 11))
    assert float(observer.histogram.sum()) == 11 and float(observer.hist_range) == 1.0
