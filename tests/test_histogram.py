"""Grid-aligned binning, gradient binning and histogram statistics (eqcore.analysis.grid, binning,
gradient_binning, histograms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eqcore.analysis.binning import bin_indices, bin_tensor, scan_values
from eqcore.analysis.gradient_binning import bin_gradient
from eqcore.analysis.grid import GridBins, QuantGrid, resampled_grid
from eqcore.analysis.histograms import GradientHistogram, TensorHistogram, histogram_stats

GRID8 = GridBins.for_range(0, 255)


def quantizer_qbin(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """round_half_even(x * (1/s)) + z with the quantizer's float32 product (unclamped)."""
    inv = torch.reciprocal(torch.tensor(scale, dtype=torch.float32))
    return torch.round(x * inv) + zero_point


def qbin_of(index: torch.Tensor, grid: GridBins) -> torch.Tensor:
    return torch.div(index.long(), grid.bins_per_qbin, rounding_mode="floor") + grid.first_qbin


@pytest.mark.parametrize("zero_point", [0, 3, 128, 255])
@pytest.mark.parametrize("scale", [0.125, 2.0**-7, 0.0371])
def test_bins_are_the_quantizers_bins_at_ties(scale: float, zero_point: int) -> None:
    k = torch.arange(-200, 300, dtype=torch.float32)
    ties = (k + 0.5) * scale  # exact ties for power-of-two scales, near-ties otherwise
    nudged = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1)])
    x = torch.cat([nudged, torch.randn(5000) * 80 * scale])
    index = bin_indices(x, torch.tensor([scale]), torch.tensor([float(zero_point)]), GRID8)
    expected = quantizer_qbin(x, scale, zero_point).clamp(GRID8.first_qbin, GRID8.last_qbin)
    assert torch.equal(qbin_of(index, GRID8).float(), expected)
    # Inside the range the bin is exactly the grid index of the fake quantizer's output.
    y = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)
    grid_index = torch.round(y / scale) + zero_point
    inside = (expected >= 0) & (expected <= 255)
    assert inside.sum() > 1000
    assert torch.equal(qbin_of(index, GRID8)[inside].float(), grid_index[inside])


def test_ties_round_half_to_even() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    index = bin_indices(x, torch.tensor([1.0]), torch.tensor([10.0]), GRID8)
    assert qbin_of(index, GRID8).tolist() == [10, 12, 12, 10, 8]


def test_counts_gradients_and_indices_agree() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 40, 50, 50) * 2 + 1
    x[0, 0, 0, :10] = 0.0
    grad = torch.randn_like(x)
    qgrid = QuantGrid.capture(torch.tensor([0.02]), torch.tensor([100.0]), GRID8)
    index = bin_indices(x, qgrid.scale, qgrid.zero_point, GRID8).reshape(-1).long()
    counted = bin_tensor(x, qgrid)
    assert counted.fast
    assert torch.equal(counted.counts, torch.bincount(index, minlength=GRID8.n_bins + 1))
    binned = bin_gradient(x, grad, qgrid, count=True)
    reference = torch.bincount(index, weights=grad.reshape(-1).double(), minlength=GRID8.n_bins + 1)
    assert torch.equal(binned.counts.counts, counted.counts)
    torch.testing.assert_close(binned.sums, reference, rtol=1e-12, atol=1e-12)
    assert binned.sums.sum().item() == pytest.approx(grad.double().sum().item(), rel=1e-12, abs=1e-9)


def test_channels_last_pairs_by_element() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 8, 6, 6)
    grad = torch.randn_like(x)
    qgrid = QuantGrid.capture(torch.tensor([0.05]), torch.tensor([128.0]), GRID8)
    plain = bin_gradient(x, grad, qgrid, count=True)
    nhwc = bin_gradient(
        x.contiguous(memory_format=torch.channels_last), grad, qgrid, count=True
    )
    assert torch.equal(plain.counts.counts, nhwc.counts.counts)
    torch.testing.assert_close(plain.sums, nhwc.sums, rtol=1e-12, atol=1e-12)
    index = bin_indices(x.contiguous(memory_format=torch.channels_last), qgrid.scale, qgrid.zero_point, GRID8)
    assert torch.equal(index, bin_indices(x, qgrid.scale, qgrid.zero_point, GRID8))


def test_score_is_grad_squared_times_quantization_error_squared() -> None:
    torch.manual_seed(2)
    x = torch.randn(200_000) * 3
    grad = torch.randn_like(x)
    scale, zero_point = 0.02, 120
    qgrid = QuantGrid.capture(torch.tensor([scale]), torch.tensor([float(zero_point)]), GRID8)
    y = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)
    expected = ((y.double() - x.double()) * grad.double()).pow(2).sum().item()
    fast = bin_gradient(x, grad, qgrid, quantizer=qgrid)
    assert fast.score.item() == pytest.approx(expected, rel=1e-4)
    per_channel_path = bin_gradient(x[None], grad[None], qgrid, quantizer=qgrid, scan=scan_values(x))
    assert per_channel_path.score.item() == pytest.approx(expected, rel=1e-4)


def test_nan_and_inf_are_counted_never_raise() -> None:
    x = torch.linspace(-0.3, 2.5, 1000)  # inside the histogram's margins
    x[3] = math.nan
    x[5] = math.inf
    x[7] = -math.inf
    x[9] = 1e30
    grad = torch.ones_like(x)
    hist = TensorHistogram(GRID8)
    hist.update(x, torch.tensor([0.01]), torch.tensor([3.0]))
    assert hist.nan_count == 1
    assert hist.inf_count == 2
    assert hist.numel == 1000
    assert hist.counts.sum() == 999
    assert hist.counts[-1] == 2  # +inf and 1e30 in the last bin
    assert hist.counts[0] == 1  # -inf in the first bin
    assert hist.value_range == (pytest.approx(-0.3), pytest.approx(1e30))
    assert hist.stats().has_nonfinite
    qgrid = QuantGrid.capture(torch.tensor([0.01]), torch.tensor([3.0]), GRID8)
    binned = bin_gradient(x, grad, qgrid, quantizer=qgrid, count=True)
    assert binned.sums.sum().item() == 1000.0
    assert binned.sums[GRID8.nan_bin].item() == 1.0
    assert torch.equal(binned.counts.counts, bin_tensor(x, qgrid).counts)
    grads = GradientHistogram(GRID8)
    grads.add_paired(x, torch.full_like(x, math.nan), qgrid)
    assert grads.has_nonfinite and grads.nan_count == 1000


def test_empty_tensor() -> None:
    hist = TensorHistogram(GRID8)
    hist.update(torch.empty(0), torch.tensor([0.1]), torch.tensor([0.0]))
    assert hist.numel == 0 and hist.calls == 1
    assert math.isnan(hist.value_range[0])
    qgrid = QuantGrid.capture(torch.tensor([0.1]), torch.tensor([0.0]), GRID8)
    assert bin_gradient(torch.empty(0), torch.empty(0), qgrid, count=True).sums.sum() == 0


def test_per_channel_bins_use_each_channels_qparams() -> None:
    torch.manual_seed(3)
    weight = torch.randn(4, 3, 3, 3)
    scale = torch.tensor([0.01, 0.02, 0.05, 0.1])
    zero_point = torch.zeros(4)
    grid = GridBins.for_range(-128, 127)
    index = bin_indices(weight, scale, zero_point, grid, ch_axis=0)
    expected = torch.round(weight * torch.reciprocal(scale).reshape(4, 1, 1, 1))
    assert torch.equal(qbin_of(index, grid).float(), expected.clamp(grid.first_qbin, grid.last_qbin))
    hist = TensorHistogram(grid, ch_axis=0)
    hist.update(weight, scale, zero_point)
    assert hist.counts.sum() == weight.numel()
    np.testing.assert_array_equal(hist.bin_edges, grid.edges)


def test_resampled_grid_bins_at_bit_res() -> None:
    scale, zero_point, qmin, qmax = resampled_grid(torch.tensor([0.01]), torch.tensor([128.0]), 0, 255, 4)
    assert (qmin, qmax) == (0, 15)
    assert scale.item() == pytest.approx(0.01 * 255 / 15)
    grid = GridBins.for_range(qmin, qmax)
    hist = TensorHistogram(grid)
    hist.update(torch.randn(1000), scale, zero_point)
    assert hist.numel == 1000


def test_stats_on_hand_made_counts() -> None:
    grid = GridBins(0, 2, bins_per_qbin=3, margin_qbins=1)  # qbins -1..3, 15 bins
    counts = np.zeros(15)
    counts[1] = 2  # qbin -1 (below), centroid
    counts[3:6] = [1, 4, 1]  # qbin 0 (the zero point)
    counts[6:9] = [0, 6, 2]  # qbin 1
    counts[9:12] = [1, 1, 0]  # qbin 2
    counts[14] = 2  # qbin 3 (above), upper edge
    stats = histogram_stats(counts, grid, zero_point=0, grid_range=(-1.2, 3.4), nan_count=1, inf_count=2)
    total = 20
    assert stats.numel == 21
    assert stats.clamped_below == pytest.approx(2 / total)
    assert stats.clamped_above == pytest.approx(2 / total)
    assert stats.clamped == pytest.approx(4 / total)
    assert stats.zero_bin == pytest.approx(6 / total)
    assert stats.off_centroid == pytest.approx((1 + 1 + 2 + 1) / total)
    np.testing.assert_allclose(stats.intra_bin_profile, np.array([2, 11, 3]) / 16)
    assert (stats.grid_min, stats.grid_max) == (-1.2, 3.4)
    assert stats.has_nonfinite


def test_gradient_stats_are_shares_of_absolute_mass() -> None:
    grid = GridBins(0, 2, bins_per_qbin=3, margin_qbins=1)
    grads = GradientHistogram(grid)
    index = torch.tensor([4, 4, 7, 14])
    grads.update(index, torch.tensor([1.0, -3.0, 2.0, 4.0]))
    stats = grads.stats(zero_point=0)
    np.testing.assert_allclose(grads.binned_grads[[4, 7, 14]], [-2.0, 2.0, 4.0])
    assert stats.zero_bin == pytest.approx(2 / 8)
    assert stats.clamped_above == pytest.approx(4 / 8)
    assert stats.numel == 4


def test_deferred_counts_settle_on_read() -> None:
    hist = TensorHistogram(GRID8)
    qgrid = QuantGrid.capture(torch.tensor([0.1]), torch.tensor([0.0]), GRID8)

    class Pending:
        settled = 0

        def settle(self) -> None:
            if not self.settled:
                self.settled = 1
                hist.add(bin_tensor(torch.ones(10), qgrid), qgrid)

    pending = Pending()
    hist.defer(pending)
    assert hist.numel == 10 and hist.calls == 1
    assert hist.numel == 10
