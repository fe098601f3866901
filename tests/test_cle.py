"""Cross-layer equalization: pair discovery (with reasons), exactness, range equalization, SQNR."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

from eqcore import equalize, find_cle_pairs, float_convbn_to_conv, get_previous_module_node
from eqcore.prepare.bias_absorption import absorb_high_bias
from eqcore.prepare.cle import relu6_to_relu
from eqcore.prepare.cle_pairs import CLEPairs, SkippedPair

TUTORIAL_PAIRS = [
    ["layer1.0.conv1", "layer1.0.conv2"],
    ["layer1.1.conv1", "layer1.1.conv2"],
    ["layer2.0.conv1", "layer2.0.conv2"],
    ["layer2.1.conv1", "layer2.1.conv2"],
    ["layer3.0.conv1", "layer3.0.conv2"],
    ["layer3.1.conv1", "layer3.1.conv2"],
    ["layer4.0.conv1", "layer4.0.conv2"],
    ["layer4.1.conv1", "layer4.1.conv2"],
]


def randomize_batchnorms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN statistics and affine params, so fused weights have uneven channel ranges."""
    g = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            n = bn.num_features
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                bn.running_var.copy_(torch.rand(n, generator=g) * 2.0 + 0.25)
                sign = torch.where(torch.rand(n, generator=g) < 0.1, -1.0, 1.0)
                bn.weight.copy_((torch.rand(n, generator=g) * 1.5 + 0.25) * sign)
                bn.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


def fused_torchvision(name: str, *, dtype=torch.float32) -> tuple[nn.Module, fx.GraphModule]:
    """(eval float model, symbolic-traced + BN-fused copy), seeded init like the tutorial."""
    torch.manual_seed(0)
    model = randomize_batchnorms(getattr(torchvision.models, name)()).to(dtype).eval()
    traced = fx.symbolic_trace(model)
    traced.eval()
    return model, float_convbn_to_conv(traced)


def out_ranges(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach().double()
    return w.abs().amax(dim=tuple(range(1, w.dim())))


def in_ranges(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach().double()
    if getattr(module, "groups", 1) > 1:  # depthwise: input channel i is output channel i
        return out_ranges(module)
    return w.abs().amax(dim=(0,) + tuple(range(2, w.dim())))


def group_ranges(model: nn.Module, group: list[str]) -> list[torch.Tensor]:
    """Per-channel ranges that CLE makes equal: out(first), [out(depthwise)], in(last)."""
    modules = [model.get_submodule(name) for name in group]
    return [out_ranges(m) for m in modules[:-1]] + [in_ranges(modules[-1])]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def resnet18_fused():
    return fused_torchvision("resnet18")


@pytest.fixture(scope="module")
def mobilenet_v2_fused():
    return fused_torchvision("mobilenet_v2")


def test_resnet18_pairs_are_the_tutorials(resnet18_fused):
    _, traced = resnet18_fused
    pairs = find_cle_pairs(traced)
    assert pairs == TUTORIAL_PAIRS
    assert pairs.pairs == TUTORIAL_PAIRS
    assert list(pairs) == TUTORIAL_PAIRS and len(pairs) == 8 and pairs[0] == TUTORIAL_PAIRS[0]

    # The seed's own loop over get_previous_module_node finds the same pairs.
    seed_pairs = []
    for node in traced.graph.nodes:
        if node.op == "call_module" and hasattr(traced.get_submodule(node.target), "weight"):
            prev = get_previous_module_node(
                traced, node, (nn.Conv2d, nn.Linear), CLE_compatible=True
            )
            if prev:
                seed_pairs.append([prev.target, node.target])
    assert seed_pairs == TUTORIAL_PAIRS


def test_resnet18_skips_are_explained(resnet18_fused):
    _, traced = resnet18_fused
    skipped = {s.module: s for s in find_cle_pairs(traced).skipped}
    assert all(isinstance(s, SkippedPair) for s in skipped.values())
    # Every conv/linear that has an upstream layer but no partner is explained.
    paired = {name for pair in TUTORIAL_PAIRS for name in pair[1:]}
    layers = {n for n, m in traced.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(skipped) == layers - paired - {"conv1"}
    assert skipped["layer1.0.conv1"].reason == (
        "maxpool output has 2 users: the fork between conv1 and layer1.0.conv1 breaks the pair"
    )
    assert skipped["layer1.0.conv1"].previous == ("conv1",)
    assert skipped["layer2.0.downsample.0"].node == "layer1_1_relu_1"
    assert skipped["fc"].reason.startswith("AdaptiveAvgPool2d between layer4.1.conv2")
    assert "is pooling" in skipped["fc"].reason


def test_mobilenet_v2_relu6_breaks_depthwise_pairs(mobilenet_v2_fused):
    _, traced = mobilenet_v2_fused
    pairs = find_cle_pairs(traced)
    depthwise = [n for n, m in traced.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17
    assert all(len(group) == 2 for group in pairs)
    for name in depthwise:
        assert not any(name in group for group in pairs)
        [record] = [s for s in pairs.skipped if s.module == name]
        assert record.reason.startswith(f"ReLU6 between {record.previous[0]} and {name} ")
        assert "is not positively homogeneous" in record.reason
        assert len(pairs.reasons_for(name)) == 2  # as the second layer and as the first
    dw1 = [s for s in pairs.skipped if s.module == "features.1.conv.1"][0]
    assert dw1.reason.startswith(
        "ReLU6 between features.1.conv.0.0 and features.1.conv.1 is not positively homogeneous"
    )


def test_relu6_to_relu_gives_depthwise_triplets(mobilenet_v2_fused):
    _, traced = mobilenet_v2_fused
    relu_model = relu6_to_relu(traced)
    assert not any(isinstance(m, nn.ReLU6) for m in relu_model.modules())
    assert any(isinstance(m, nn.ReLU6) for m in traced.modules()), "not inplace by default"
    pairs = find_cle_pairs(relu_model)
    triplets = [group for group in pairs if len(group) == 3]
    expected = [["features.0.0", "features.1.conv.0.0", "features.1.conv.1"]] + [
        [f"features.{k}.conv.0.0", f"features.{k}.conv.1.0", f"features.{k}.conv.2"]
        for k in range(2, 18)
    ]
    assert triplets == expected
    # Projections that feed the next block directly (no residual add) also pair with it.
    assert ["features.1.conv.1", "features.2.conv.0.0"] in pairs
    assert ["features.17.conv.2", "features.18.0"] in pairs
    assert pairs.pairs.index(expected[0]) < pairs.pairs.index(expected[1])


class Chain(nn.Module):
    """a -> between -> b, the smallest candidate pair."""

    def __init__(self, between: nn.Module, *, b: nn.Module | None = None):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.between = between
        self.b = b if b is not None else nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.between(self.a(x)))


class Fn(nn.Module):
    """Wraps a function so that tracing records it as call_function / call_method."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.a2 = nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.a(x) + self.a2(x))


class Concat(Residual):
    def __init__(self):
        super().__init__()
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.b(torch.cat([self.a(x), self.a2(x)], dim=1))


class Fork(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y) + self.c(y)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.b(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("relu6", [nn.ReLU6(), Fn(F.relu6)], ids=["module", "function"])
def test_relu6_to_relu_unblocks_the_pair(relu6):
    traced = fx.symbolic_trace(Chain(relu6))
    assert find_cle_pairs(traced) == []
    assert find_cle_pairs(relu6_to_relu(traced)) == [["a", "b"]]
    assert find_cle_pairs(traced) == [], "not inplace by default"
    assert relu6_to_relu(traced, inplace=True) is traced
    torch.manual_seed(0)
    model = Chain(relu6)
    x = torch.randn(1, 4, 5, 5) * 100
    assert not torch.allclose(relu6_to_relu(fx.symbolic_trace(model))(x), model(x)), (
        "relu6_to_relu changes the function (no clipping at 6)"
    )


BREAKERS = {
    "add-residual": (Residual, "add between a / a2 and b (residual) breaks the pair"),
    "add-constant": (lambda: Chain(Fn(lambda x: x + 1.0)),
                     "add of a constant between a and b is not positively homogeneous"),
    "cat": (Concat, "cat between a / a2 and b (concatenation) breaks the pair"),
    "grouped": (lambda: Chain(nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4))),
                "grouped conv (groups=4) is not equalizable"),
    "depthwise-multiplier": (lambda: Chain(nn.Identity(), b=nn.Conv2d(8, 16, 3, groups=8)),
                             "depthwise conv with channel multiplier 2"),
    "sigmoid": (lambda: Chain(nn.Sigmoid()),
                "Sigmoid between a and b is not positively homogeneous"),
    "torch.sigmoid": (lambda: Chain(Fn(torch.sigmoid)),
                      "sigmoid between a and b is not positively homogeneous"),
    "gelu": (lambda: Chain(nn.GELU()), "GELU between a and b is not positively homogeneous"),
    "silu": (lambda: Chain(Fn(F.silu)), "silu between a and b is not positively homogeneous"),
    "relu6": (lambda: Chain(nn.ReLU6()), "ReLU6 between a and b is not positively homogeneous"),
    "hardswish": (lambda: Chain(nn.Hardswish()), "Hardswish between a and b"),
    "padded-avgpool": (lambda: Chain(nn.AvgPool2d(3, stride=1, padding=1)),
                       "AvgPool2d (padding=1) between a and b is pooling"),
    "maxpool": (lambda: Chain(nn.MaxPool2d(2)), "MaxPool2d between a and b is pooling"),
    "unfused-bn": (lambda: Chain(nn.BatchNorm2d(8)), "run float_convbn_to_conv first"),
    "fork": (Fork, "relu output has 2 users: the fork between a and b breaks the pair"),
    "shared-module": (Shared, "b is called 2 times in the graph (shared weights)"),
    "conv-linear-no-flatten": (lambda: Chain(nn.ReLU(), b=nn.Linear(8, 3)),
                               "b (Linear) acts on the last axis of a's output"),
    "flatten-merges-channels": (lambda: Chain(nn.Flatten(), b=nn.Linear(8 * 16, 3)),
                                "a has 8 output channels but b has 128 input channels"),
    "flatten-batch": (lambda: Chain(Fn(torch.flatten), b=nn.Linear(8, 3)),
                      "flatten between a and b flattens the batch axis"),
}


@pytest.mark.parametrize("case", list(BREAKERS))
def test_ops_that_break_a_pair_are_reported(case):
    build, reason = BREAKERS[case]
    traced = fx.symbolic_trace(build().eval())
    pairs = find_cle_pairs(traced)
    assert pairs == []
    reasons = [s.reason for s in pairs.skipped]
    assert any(reason in r for r in reasons), reasons
    b_node = next(n for n in traced.graph.nodes if n.target == "b")
    assert get_previous_module_node(traced, b_node, (nn.Conv2d, nn.Linear)) is None


def test_dropout_in_training_mode_breaks_the_pair():
    model = Chain(nn.Sequential(nn.ReLU(), nn.Dropout(0.5)))
    traced = fx.symbolic_trace(model)
    traced.train()
    pairs = find_cle_pairs(traced)
    assert pairs == [] and "Dropout between a and b is in training mode" in pairs.skipped[0].reason
    traced.eval()
    assert find_cle_pairs(traced) == [["a", "b"]]


class Flattened(nn.Module):
    def __init__(self, flatten):
        super().__init__()
        self.a = nn.Conv2d(4, 8, 4)
        self.flatten = flatten
        self.b = nn.Linear(8, 3)

    def forward(self, x):  # x: (N, 4, 4, 4) -> a: (N, 8, 1, 1)
        return self.b(self.flatten(torch.relu(self.a(x))))


ALLOWED = {
    "ReLU": lambda: Chain(nn.ReLU(inplace=True)),
    "LeakyReLU": lambda: Chain(nn.LeakyReLU(0.1)),
    "Identity": lambda: Chain(nn.Identity()),
    "Dropout-eval": lambda: Chain(nn.Dropout(0.3)),
    "F.relu": lambda: Chain(Fn(F.relu)),
    "torch.relu": lambda: Chain(Fn(torch.relu)),
    "method-relu": lambda: Chain(Fn(lambda x: x.relu())),
    "F.leaky_relu": lambda: Chain(Fn(lambda x: F.leaky_relu(x, 0.2))),
    "F.dropout-eval": lambda: Chain(Fn(lambda x: F.dropout(x, 0.5, training=False))),
    "nothing": lambda: Chain(nn.Sequential()),
    "several": lambda: Chain(nn.Sequential(nn.ReLU(), nn.Dropout(), nn.LeakyReLU(), nn.ReLU())),
    "depthwise-second": lambda: Chain(nn.ReLU(), b=nn.Conv2d(8, 8, 3, groups=8)),
    "nn.Flatten-spatial-1": lambda: Flattened(nn.Flatten()),
    "torch.flatten-spatial-1": lambda: Flattened(Fn(lambda x: torch.flatten(x, 1))),
}


@pytest.mark.parametrize("case", list(ALLOWED))
def test_positively_homogeneous_ops_keep_the_pair(case):
    torch.manual_seed(0)
    model = ALLOWED[case]().double().eval()
    traced = fx.symbolic_trace(model)
    pairs = find_cle_pairs(traced)
    assert pairs == [["a", "b"]], pairs.skipped
    b_node = next(n for n in traced.graph.nodes if n.target == "b")
    assert get_previous_module_node(traced, b_node, (nn.Conv2d, nn.Linear)).target == "a"
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    equalized = equalize(traced, pairs)
    assert rel_err(equalized(x), model(x)) < 1e-12
    r1, r2 = group_ranges(equalized, ["a", "b"])
    torch.testing.assert_close(r1, r2, rtol=1e-9, atol=0)


def test_get_previous_module_node_without_cle_check():
    traced = fx.symbolic_trace(Chain(nn.Sequential(nn.Sigmoid(), nn.MaxPool2d(2))))
    b_node = next(n for n in traced.graph.nodes if n.target == "b")
    assert get_previous_module_node(traced, b_node, nn.Conv2d, CLE_compatible=True) is None
    assert get_previous_module_node(traced, b_node, nn.Conv2d, CLE_compatible=False).target == "a"
    a_node = next(n for n in traced.graph.nodes if n.target == "a")
    assert get_previous_module_node(traced, a_node, nn.Conv2d, CLE_compatible=False) is None


def test_cle_pairs_behaves_like_a_list():
    pairs = CLEPairs(pairs=[["a", "b"], ["c", "d", "e"]])
    assert pairs == [["a", "b"], ["c", "d", "e"]] and pairs == [("a", "b"), ("c", "d", "e")]
    assert pairs != [["a", "b"]]
    assert len(pairs) == 2 and pairs[-1] == ["c", "d", "e"] and ["a", "b"] in pairs
    assert [g for g in pairs] == pairs.pairs
    assert "skipped" in repr(pairs)


def test_find_cle_pairs_rejects_bad_input():
    with pytest.raises(TypeError, match="symbolic_trace"):
        find_cle_pairs(Chain(nn.ReLU()))
    with pytest.raises(ValueError, match="ConvTranspose2d"):
        find_cle_pairs(fx.symbolic_trace(Chain(nn.ReLU())), types=(nn.ConvTranspose2d,))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_equalize_preserves_float64_output_and_equalizes_ranges(name):
    model, traced = fused_torchvision(name, dtype=torch.float64)
    if name == "mobilenet_v2":
        model = relu6_to_relu(model)  # the reference must compute the same (changed) function
        traced = relu6_to_relu(traced, inplace=True)
    pairs = find_cle_pairs(traced)
    before = {tuple(g): group_ranges(traced, g) for g in pairs}
    # Overlapping groups (mobilenet) converge geometrically; ask for 1e-6-equal ranges.
    equalized = equalize(traced, pairs, threshold=1e-9, max_iter=500)

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(equalized(x), model(x)) < 1e-9
    uses: dict[str, int] = {}
    for group in pairs:
        for layer in group:
            uses[layer] = uses.get(layer, 0) + 1
    uneven = 0
    for group in pairs:
        ranges = group_ranges(equalized, group)
        for r in ranges[1:]:
            torch.testing.assert_close(r, ranges[0], rtol=1e-6, atol=0)
        r0 = before[tuple(group)]
        uneven += int(max(rel_err(r, r0[0]) for r in r0[1:]) > 0.1)
        if len(group) == 3 and all(uses[layer] == 1 for layer in group):
            # An isolated triplet keeps r1 * r2 * r3 per channel: the cube-root rule.
            torch.testing.assert_close(ranges[0] ** 3, r0[0] * r0[1] * r0[2], rtol=1e-6, atol=0)
    assert uneven == len(pairs), "ranges should have been uneven before CLE"
    assert not torch.equal(traced.get_submodule(pairs[0][0]).weight,
                           equalized.get_submodule(pairs[0][0]).weight), "not inplace"


class DepthwiseChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.c = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.dw(torch.relu(self.a(x)))))


def test_equalize_zero_range_channels_keep_scale_one():
    torch.manual_seed(0)
    model = Chain(nn.ReLU()).double()
    with torch.no_grad():
        model.a.weight[0] = 0.0  # dead output channel of a
        model.a.bias[0] = 0.0
        model.b.weight[:, 1] = 0.0  # input channel of b that nothing reads
    equalized = equalize(model, [["a", "b"]])
    for p in equalized.parameters():
        assert torch.isfinite(p).all()
    assert torch.equal(equalized.b.weight[:, 0], model.b.weight[:, 0])  # s_0 = 1
    assert torch.equal(equalized.a.weight[1], model.a.weight[1])  # s_1 = 1
    assert not torch.equal(equalized.a.weight[2], model.a.weight[2])
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert rel_err(equalized(x), model(x)) < 1e-12

    model = DepthwiseChain().double()
    with torch.no_grad():
        model.dw.weight[2] = 0.0
    equalized = equalize(model, [["a", "dw", "c"]])
    for p in equalized.parameters():
        assert torch.isfinite(p).all()
    assert torch.equal(equalized.a.weight[2], model.a.weight[2])
    assert torch.equal(equalized.c.weight[:, 2], model.c.weight[:, 2])
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert rel_err(equalized(x), model(x)) < 1e-12


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)), (4, 5)),
        (nn.Sequential(nn.Linear(5, 7), nn.LeakyReLU(), nn.Linear(7, 3)), (4, 6, 5)),
        (nn.Sequential(nn.Conv1d(3, 6, 3), nn.ReLU(), nn.Conv1d(6, 2, 3)), (2, 3, 9)),
        (nn.Sequential(nn.Conv3d(3, 6, 3), nn.ReLU(), nn.Conv3d(6, 2, 1)), (2, 3, 4, 4, 4)),
        (nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6),
                       nn.ReLU(), nn.Conv2d(6, 2, 1)), (2, 3, 7, 7)),
    ],
    ids=["linear", "linear-3d-input", "conv1d", "conv3d", "triplet-no-bias"],
)
def test_equalize_layer_kinds(model, shape):
    torch.manual_seed(0)
    model = model.double().eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-2, 2, model[0].weight.shape[0], dtype=torch.float64)
                             .reshape((-1,) + (1,) * (model[0].weight.dim() - 1)))
    traced = fx.symbolic_trace(model)
    pairs = find_cle_pairs(traced)
    assert pairs == ([["0", "2", "4"]] if len(model) == 5 else [["0", "2"]])
    equalized = equalize(traced, pairs)
    x = torch.randn(shape, dtype=torch.float64)
    assert rel_err(equalized(x), model(x)) < 1e-12
    ranges = group_ranges(equalized, pairs[0])
    for r in ranges[1:]:
        torch.testing.assert_close(r, ranges[0], rtol=1e-9, atol=0)


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def quantize_weights_per_tensor(model: nn.Module) -> nn.Module:
    """Symmetric per-tensor int8 weights (scale from max|W|); activations stay float."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                scale = m.weight.abs().max().item() / 127.0
                m.weight.copy_(torch.fake_quantize_per_tensor_affine(m.weight, scale, 0, -128, 127))
    return model


def sqnr_db(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = model(x)
        noise = y - quantize_weights_per_tensor(model)(x)
    return 10 * torch.log10(y.pow(2).sum() / noise.pow(2).sum()).item()


def test_equalize_recovers_per_tensor_sqnr_of_rescaled_model():
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    rescaled = copy.deepcopy(model)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    factors = torch.logspace(-3, 3, 16)[order]
    with torch.no_grad():
        rescaled.conv1.weight.mul_(factors.reshape(-1, 1, 1, 1))
        rescaled.conv1.bias.mul_(factors)
        rescaled.conv2.weight.div_(factors.reshape(1, -1, 1, 1))
        assert rel_err(rescaled(x), model(x)) < 1e-4  # same float function

    pairs = find_cle_pairs(fx.symbolic_trace(model))
    assert pairs == [["conv1", "conv2"], ["conv2", "conv3"]]
    reference = sqnr_db(model, x)
    broken = sqnr_db(rescaled, x)
    recovered = sqnr_db(equalize(rescaled, pairs), x)
    equalized_reference = sqnr_db(equalize(model, pairs), x)

    assert reference > 30
    assert broken < reference / 2, (reference, broken)
    assert recovered > reference - 1.0, (reference, recovered)
    assert equalized_reference > reference - 1.0, (reference, equalized_reference)


def test_equalize_options_and_validation():
    torch.manual_seed(0)
    model = DepthwiseChain()
    assert equalize(model, [["a", "dw", "c"]], inplace=True) is model
    assert equalize(model, [], inplace=False) is not model
    with pytest.warns(RuntimeWarning, match="did not converge in 1 sweeps"):
        equalize(SmallConvNet(), [["conv1", "conv2"], ["conv2", "conv3"]], max_iter=1)
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        equalize(model, [["a", "nope"]])
    with pytest.raises(ValueError, match="middle layer must be a depthwise conv"):
        equalize(model, [["a", "c", "dw"]])
    with pytest.raises(ValueError, match="conv1 has 16 output channels but conv3 has 32"):
        equalize(SmallConvNet(), [["conv1", "conv3"]])
    with pytest.raises(ValueError, match="2 or 3 layers"):
        equalize(model, [["a"]])
    with pytest.raises(ValueError, match="only Conv1d/2d/3d and Linear"):
        equalize(Chain(nn.ReLU()), [["a", "between"]])


# --- high-bias absorption ---------------------------------------------------------------------


class BiasedChain(nn.Module):
    """conv/linear -> BN (large positive beta, small gamma) -> ReLU -> [depthwise -> BN -> ReLU] -> last."""

    def __init__(self, kind: str, padding: int = 0) -> None:
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.first, self.bn1, self.last = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)
        else:
            self.first, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
            self.last = nn.Conv2d(8, 4, 3, padding=padding, bias=False)
        if kind == "depthwise":
            self.dw, self.bn2 = nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8)
        g = torch.Generator().manual_seed(3)
        for bn in (m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            with torch.no_grad():
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 4 + 4)
                bn.weight.copy_(torch.rand(bn.num_features, generator=g) * 0.3 + 0.1)
                bn.bias.copy_(torch.rand(bn.num_features, generator=g) * 2 + 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.first(x)))
        if self.kind == "depthwise":
            x = F.relu(self.bn2(self.dw(x)))
        return self.last(x)


def absorbable(kind: str, padding: int = 0) -> tuple[fx.GraphModule, CLEPairs, torch.Tensor]:
    torch.manual_seed(0)
    model = BiasedChain(kind, padding).double().eval()
    fused = float_convbn_to_conv(fx.symbolic_trace(model))
    x = torch.randn(16, 6, dtype=torch.float64) if kind == "linear" else torch.randn(2, 3, 9, 9, dtype=torch.float64)
    return fused, find_cle_pairs(fused), x


def preactivations_stay_above_c(model: nn.Module, x: torch.Tensor, n_std: float) -> bool:
    """The exactness condition: every output of a layer with statistics is >= beta - n_std * gamma."""
    ok = True

    def check(module, _inputs, output):
        nonlocal ok
        c = (module.eq_preact_mean - n_std * module.eq_preact_std).clamp_min(0)
        shape = (1, -1) + (1,) * (output.dim() - 2)
        ok &= bool((output >= c.reshape(shape)).all())

    handles = [m.register_forward_hook(check) for m in model.modules() if hasattr(m, "eq_preact_mean")]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return ok


def test_fusion_keeps_the_batchnorm_statistics_outside_the_state_dict():
    fused, _, _ = absorbable("linear")
    bn = BiasedChain("linear").double().bn1
    torch.testing.assert_close(fused.first.eq_preact_mean, bn.bias.detach(), rtol=0, atol=0)
    torch.testing.assert_close(fused.first.eq_preact_std, bn.weight.detach().abs(), rtol=0, atol=0)
    assert not any(key.endswith(("eq_preact_mean", "eq_preact_std")) for key in fused.state_dict())


@pytest.mark.parametrize("kind", ["linear", "conv", "depthwise"])
@pytest.mark.parametrize("cle", [False, True], ids=["fused", "equalized"])
def test_high_bias_absorption_keeps_the_output_where_activations_stay_above_c(kind, cle):
    fused, pairs, x = absorbable(kind)
    model = equalize(fused, pairs) if cle else fused
    assert preactivations_stay_above_c(model, x, 3.0)  # the test's precondition
    first_bias = model.first.bias.detach().clone()

    absorbed, report = absorb_high_bias(model, pairs)

    assert [(r.first, r.second) for r in report] == [tuple(p) for g in pairs for p in zip(g, g[1:])]
    c = report[0].absorbed.double()
    assert report[0].channels == 8 and bool((c > 0).all())
    torch.testing.assert_close(absorbed.first.bias.detach(), first_bias - c, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        want, got = model(x), absorbed(x)
    assert rel_err(got, want) < 1e-12
    assert model.first.bias.detach().equal(first_bias)  # a copy unless inplace
    if cle:  # the statistics followed each channel's scaling: c shrank with the channel
        c_fused = absorb_high_bias(fused, pairs)[1][0].absorbed.double()
        scaling = out_ranges(model.first) / out_ranges(fused.first)
        assert not torch.allclose(scaling, torch.ones_like(scaling))
        torch.testing.assert_close(c, c_fused * scaling, rtol=1e-5, atol=1e-6)


def test_high_bias_absorption_on_a_padded_conv_moves_only_the_border():
    fused, pairs, x = absorbable("conv", padding=1)
    absorbed, report = absorb_high_bias(fused, pairs)
    assert report and report[0].channels == 8
    with torch.no_grad():
        want, got = fused(x), absorbed(x)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert rel_err(got[inner], want[inner]) < 1e-12
    assert rel_err(got, want) > 1e-3  # the taps on the zero padding no longer see c


def test_high_bias_absorption_needs_statistics_and_a_valid_n_std():
    model = Chain(nn.ReLU()).eval()  # no BatchNorm was folded: nothing is known about the output
    absorbed, report = absorb_high_bias(model, [["a", "b"]])
    assert report == []
    assert absorbed.a.bias.equal(model.a.bias)
    fused, pairs, _ = absorbable("linear")
    assert absorb_high_bias(fused, pairs, inplace=True)[0] is fused
    for bad in (-1.0, float("nan"), "3"):
        with pytest.raises(ValueError, match="n_std must be a finite number >= 0"):
            absorb_high_bias(fused, pairs, n_std=bad)


def test_prepare_applies_high_bias_absorption_after_cle():
    from eqcore.prepare.calibrate import calibrate
    from eqcore.prepare.quantize import prepare

    torch.manual_seed(0)
    model = BiasedChain("conv").eval()
    x = torch.randn(4, 3, 9, 9)
    plain = prepare(model, "w8a8", (x,), cle=True)
    absorbed = prepare(model, "w8a8", (x,), cle=True, high_bias_absorption=True)
    expected, report = absorb_high_bias(plain.float_model, plain.cle_pairs)
    assert report[0].channels == 8
    assert absorbed.float_model.first.bias.equal(expected.first.bias)
    assert absorbed.float_model.last.bias.equal(expected.last.bias)
    for prepared in (plain, absorbed):
        calibrate(prepared.model, [x])
    with torch.no_grad():
        first_out = [F.relu(p.float_model.first(x)).amax() for p in (plain, absorbed)]
        outputs = [p.model(x) for p in (plain, absorbed)]
    assert first_out[1] < first_out[0]  # the activation range the quantizer must cover shrank
    assert rel_err(outputs[1], outputs[0]) < 0.05
    with pytest.raises(ValueError, match="needs fuse_bn=True"):
        prepare(model, "w8a8", (x,), fuse_bn=False, high_bias_absorption=True)
