"""Seeded models carry signal: zero heads re-initialised, BatchNorm statistics set from seeded
noise, over every torchvision classifier; and the detector of degenerate outputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from eqcore.analysis.degenerate import degenerate_output
from eqcore.models.seeding import (
    seed_batchnorm_statistics,
    seed_degenerate_heads,
    seed_informative,
    seed_variance_preserving,
)
from eqcore.models.zoo import available_models, get_model

# Built and run in about a second on one loaded core: one or more of most families. The rest is slow.
FAST = {
    "efficientnet_b0", "efficientnet_b1", "mnasnet0_5", "mnasnet1_0", "mobilenet_v2", "mobilenet_v3_large",
    "mobilenet_v3_small", "regnet_x_400mf", "regnet_x_800mf", "regnet_y_400mf", "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0", "squeezenet1_0", "squeezenet1_1",
}
# A forward of these takes minutes on CI's cores; their smaller siblings run one.
GIANT = {"vit_h_14", "regnet_y_128gf"}
TORCHVISION = [name for name in available_models() if name != "digits"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on shared, loaded cores a second OpenMP thread makes these forwards 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Headed(nn.Module):
    """conv -> BN -> dropout -> pool -> linear head whose weight is zero, like vit_b_16's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 4)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, 0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.bn(self.conv(x))).mean((2, 3)))


def test_zero_heads_get_a_seeded_default_init_and_nothing_else_changes() -> None:
    torch.manual_seed(0)
    model = Headed()
    conv_before = model.conv.weight.clone()
    rng = torch.get_rng_state()
    assert seed_degenerate_heads(model, seed=3) == ["head"]
    assert torch.equal(torch.get_rng_state(), rng)
    bound = 1 / math.sqrt(6)
    weight = model.head.weight
    assert weight.abs().max() <= bound and weight.abs().max() > bound / 2 and weight.unique().numel() == weight.numel()
    assert torch.equal(model.head.bias, torch.full((4,), 0.25))
    assert torch.equal(model.conv.weight, conv_before)
    # Deterministic per seed, different across seeds; a second call finds nothing left to do.
    again, other = Headed(), Headed()
    seed_degenerate_heads(again, seed=3)
    seed_degenerate_heads(other, seed=4)
    assert torch.equal(again.head.weight, weight) and not torch.equal(other.head.weight, weight)
    assert seed_degenerate_heads(model, seed=3) == []


def test_zero_normalisation_weights_are_left_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    nn.init.zeros_(model[1].weight)  # a zero-init residual branch: the skip carries the signal
    assert seed_degenerate_heads(model, seed=0) == []
    assert not model[1].weight.any()


def test_batchnorm_statistics_are_those_of_the_seeded_batch() -> None:
    torch.manual_seed(0)
    model = Headed().eval()
    model.drop.train()  # a flag that must come back as it was
    seen = []
    model.bn.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach().clone()))
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert seed_batchnorm_statistics(model, (x,)) == ["bn"]
    (features,) = seen
    assert torch.allclose(model.bn.running_mean, features.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(model.bn.running_var, features.var((0, 2, 3), unbiased=True), rtol=1e-5)
    assert model.bn.momentum == 0.1 and not model.bn.training and model.drop.training and not model.training
    # Normalised now: on that batch, BN's eval output has zero mean and unit variance per channel.
    with torch.no_grad():
        out = model.bn(features)
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(6), atol=1e-5)
    assert torch.allclose(out.var((0, 2, 3)), torch.ones(6), atol=1e-3)


def test_seed_informative_reports_what_it_changed() -> None:
    model = Headed()
    changes = seed_informative(model, (torch.randn(2, 3, 8, 8),), seed=0)
    assert changes.heads == ("head",) and changes.batchnorms == ("bn",)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    assert seed_informative(plain, (torch.randn(2, 3, 2, 2),), seed=0).batchnorms == ()


class Encoder(nn.Module):
    """Linear layers at transformers' fixed-std init (0.02), a LayerNorm and an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.norm = nn.LayerNorm(64)
        self.up, self.down = nn.Linear(64, 256), nn.Linear(256, 64, bias=False)
        for module in (self.embed, self.up, self.down):
            nn.init.normal_(module.weight, std=0.02)
        nn.init.constant_(self.up.bias, 0.1)


def test_variance_preserving_linears_keep_their_input_scale_and_nothing_else_changes() -> None:
    torch.manual_seed(0)
    model = Encoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert seed_variance_preserving(model, seed=3) == ["up", "down"]
    assert torch.equal(torch.get_rng_state(), rng)
    for layer in (model.up, model.down):
        fan_in = layer.weight.shape[1]
        assert layer.weight.std().item() * math.sqrt(fan_in) == pytest.approx(1.0, abs=0.05)
    after = model.state_dict()
    for key in ("embed.weight", "norm.weight", "norm.bias", "up.bias"):
        assert torch.equal(after[key], before[key]), key
    # A unit-scale input keeps its scale through a layer (it shrank to 0.16 at std 0.02).
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model.up(x) - model.up.bias).std().item() == pytest.approx(1.0, abs=0.05)
    # Deterministic per seed, different across seeds.
    again, other = Encoder(), Encoder()
    seed_variance_preserving(again, seed=3)
    seed_variance_preserving(other, seed=4)
    assert torch.equal(again.up.weight, model.up.weight) and not torch.equal(other.up.weight, model.up.weight)
    assert seed_informative(Encoder(), (torch.zeros(2, 3, dtype=torch.long),), seed=0).rescaled == ()
    changes = seed_informative(Encoder(), (torch.zeros(2, 3, dtype=torch.long),), seed=0, variance_preserving=True)
    assert changes.rescaled == ("up", "down") and changes.heads == ()


def test_weights_from_a_file_are_not_reseeded(tmp_path) -> None:
    state = get_model("mobilenet_v3_small").model.state_dict()
    state["classifier.3.weight"] = torch.zeros_like(state["classifier.3.weight"])
    state["features.0.1.running_var"] = torch.ones_like(state["features.0.1.running_var"])
    torch.save(state, tmp_path / "zero_head.pt")
    loaded = get_model("mobilenet_v3_small", weights=tmp_path / "zero_head.pt").model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in TORCHVISION])
def test_every_seeded_torchvision_classifier_carries_signal(name: str) -> None:
    zoo = get_model(name)
    model = zoo.model
    zero = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any()]
    assert not zero
    # Every BatchNorm holds the statistics of the seeding batch, not the fresh 0 / 1.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.num_batches_tracked == 1 and not torch.equal(module.running_var, torch.ones_like(module.running_var))
    if name in GIANT:
        return
    x = torch.randn((2, *zoo.spec.shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, len(zoo.labels))
    assert degenerate_output(logits) is None
    # Logits of sane size (neither vanished nor exploded), and the two inputs give different ones.
    assert 1e-3 < logits.abs().max() < 1e3
    spread = (logits[0] - logits[1]).abs().max() / logits.abs().max()
    assert spread > 1e-2


ROWS = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.1, -0.4]])


@pytest.mark.parametrize(
    ("float_logits", "quant_logits", "phrase"),
    [
        (ROWS, ROWS * 0.9, None),
        (ROWS[:1], ROWS[:1], None),  # one input: constancy cannot be told
        (torch.zeros(3, 5), None, "all zero on all 3 inputs"),
        (torch.tensor([0.5, -1.0, 2.0]).repeat(4, 1), None, "the same for all 4 inputs"),
        (torch.tensor([[1e-13, 2e-13], [3e-13, -1e-13]]), None, None),  # tiny but varying: signal
        (torch.tensor([[1e6, 1.0], [1e6 + 0.01, 1.0]]), None, "the same for all 2 inputs"),  # below float32 resolution
        (torch.tensor([[1.0, math.nan], [0.0, 1.0]]), None, "float model's logits contain 1 NaN and 0 inf"),
        (torch.tensor([[1.0, math.inf], [0.0, -math.inf]]), None, "contain 0 NaN and 2 inf"),
        (ROWS, torch.zeros(2, 3), "fake-quant model's logits are all zero"),
        (ROWS, torch.tensor([[math.nan, 0, 0], [0, 0, 0]]), "fake-quant model's logits contain 1 NaN"),
    ],
)
def test_degenerate_output(float_logits, quant_logits, phrase) -> None:
    reason = degenerate_output(float_logits, quant_logits)
    if phrase is None:
        assert reason is None
    else:
        assert reason is not None and phrase in reason
