"""Metrics against direct float64 numpy formulas, dataset evaluation, and the seeds' evaluate()."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from eqcore.models.digits_data import digits_loaders
from eqcore.models.loaders import get_loaders
from eqcore.models.samples import sample_images
from eqcore.models.specs import imagenet_spec
from eqcore.errors import EQError
from eqcore.analysis.evaluate import collect_logits, evaluate, evaluate_dataset, per_layer_sqnr
from eqcore.analysis.metrics import (
    cosine_similarity,
    fidelity,
    kl_divergence,
    sqnr,
    top1_agreement,
    topk_accuracy,
)
from eqcore.models.zoo import get_model

RNG = np.random.default_rng(7)


def _np_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def test_topk_accuracy_counts_labeled_rows_only():
    logits = torch.tensor(
        [[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4], [0.9, 0.05, 0.05]]
    )
    labels = torch.tensor([1, 2, 0, -1, 0])
    # top-1 predictions 1, 0, 2, (skip), 0 -> hits on rows 0 and 4 of 4 labeled rows
    assert topk_accuracy(logits, labels, k=1) == pytest.approx(2 / 4)
    # top-2 sets {1,0}, {0,1}/{0,2}, {2,1}, -, {0,1}: row 0 hit, row 1 (label 2) tie-dependent
    top2 = np.argsort(-logits.numpy(), axis=1, kind="stable")[:, :2]
    expected = np.mean([labels[i].item() in top2[i] for i in (0, 1, 2, 4)])
    assert topk_accuracy(logits, labels, k=2) == pytest.approx(expected)
    assert topk_accuracy(logits, labels, k=3) == 1.0


def test_topk_accuracy_without_labels_is_nan_and_bad_inputs_raise():
    assert math.isnan(topk_accuracy(torch.zeros(3, 4), torch.full((3,), -1)))
    with pytest.raises(ValueError, match="k must be"):
        topk_accuracy(torch.zeros(3, 4), torch.zeros(3), k=5)
    with pytest.raises(ValueError, match="labels"):
        topk_accuracy(torch.zeros(3, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="labels must be"):
        topk_accuracy(torch.zeros(3, 4), torch.tensor([0, 4, 1]))


def test_sqnr_matches_the_float64_formula():
    ref = RNG.standard_normal((4, 5, 6))
    test = ref + 0.01 * RNG.standard_normal(ref.shape)
    expected = 10 * np.log10(np.sum(ref**2) / np.sum((ref - test) ** 2))
    assert sqnr(torch.from_numpy(ref).float(), torch.from_numpy(test).float()) == pytest.approx(expected, abs=1e-3)
    assert sqnr(torch.from_numpy(ref), torch.from_numpy(test)) == pytest.approx(expected, rel=1e-12)
    # signal 2, noise 0.01 + 0.01 = 0.02 -> 10 log10(100) = 20 dB
    assert sqnr(torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([1.1, 0.9], dtype=torch.float64)) == pytest.approx(20.0)


def test_sqnr_edge_cases():
    x = torch.randn(10)
    assert sqnr(x, x.clone()) == math.inf
    assert sqnr(torch.zeros(3), torch.zeros(3)) == math.inf
    assert sqnr(torch.zeros(3), torch.ones(3)) == -math.inf
    with pytest.raises(ValueError, match="shape"):
        sqnr(torch.zeros(3), torch.zeros(4))


def test_cosine_similarity_matches_numpy():
    a, b = RNG.standard_normal(50), RNG.standard_normal(50)
    expected = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cosine_similarity(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-12)
    assert cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])) == 0.0
    assert cosine_similarity(torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 4.0]])) == pytest.approx(1.0)
    assert cosine_similarity(torch.zeros(3), torch.zeros(3)) == 1.0
    assert cosine_similarity(torch.zeros(3), torch.ones(3)) == 0.0


def test_top1_agreement():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 5.0]])
    test = torch.tensor([[0.9, 0.1], [1.0, 0.0], [3.0, 1.0], [1.0, 0.0]])
    assert top1_agreement(ref, test) == 0.5


def test_kl_divergence_matches_numpy_and_is_stable():
    ref, test = RNG.standard_normal((6, 10)) * 3, RNG.standard_normal((6, 10)) * 3
    p, q = _np_softmax(ref), _np_softmax(test)
    expected = np.mean(np.sum(p * np.log(p / q), axis=1))
    assert kl_divergence(torch.from_numpy(ref).float(), torch.from_numpy(test).float()) == pytest.approx(expected, rel=1e-5)
    assert kl_divergence(torch.from_numpy(ref), torch.from_numpy(ref)) == 0.0
    # p = (~0, 1), q = (1, ~0): KL = log(1 / e^-1000) = 1000 nats, no overflow to inf/nan
    huge = kl_divergence(torch.tensor([[0.0, 1000.0]]), torch.tensor([[1000.0, 0.0]]))
    assert huge == pytest.approx(1000.0)


def test_fidelity_bundles_the_metrics():
    ref, test = torch.randn(8, 5), torch.randn(8, 5)
    result = fidelity(ref, test)
    assert result.sqnr_db == sqnr(ref, test) and result.kl_divergence == kl_divergence(ref, test)
    assert result.top1_agreement == top1_agreement(ref, test)


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.second = nn.Linear(6, 3)

    def forward(self, x):
        return self.second(self.act(self.first(x)))


def test_per_layer_sqnr_against_direct_outputs():
    torch.manual_seed(0)
    float_model = _TwoLayer().double()
    quant_model = copy.deepcopy(float_model)
    with torch.no_grad():
        quant_model.second.weight.add_(0.05 * torch.randn_like(quant_model.second.weight))
    batches = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    result = per_layer_sqnr(float_model, quant_model, batches)
    assert list(result) == ["first", "second"]
    assert result["first"] == math.inf
    with torch.no_grad():
        hidden = torch.cat([float_model.act(float_model.first(x)) for x in batches]).numpy()
    ref = hidden @ float_model.second.weight.detach().numpy().T + float_model.second.bias.detach().numpy()
    test = hidden @ quant_model.second.weight.detach().numpy().T + quant_model.second.bias.detach().numpy()
    expected = 10 * np.log10(np.sum(ref**2) / np.sum((ref - test) ** 2))
    assert result["second"] == pytest.approx(expected, rel=1e-9)
    assert per_layer_sqnr(float_model, quant_model, batches[0], layer_names=["second"]).keys() == {"second"}
    with pytest.raises(EQError, match="act"):
        per_layer_sqnr(float_model, quant_model, batches, layer_names=["act"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Please use quant_min:UserWarning")
def test_per_layer_sqnr_between_bn_fused_float_and_fake_quant_digits():
    from eqcore._torch_ao import prepare_qat_fx, tq

    zoo_model = get_model("digits")
    loaders = digits_loaders(zoo_model.spec, batch_size=150)
    fused = tq.fuse_modules(
        copy.deepcopy(zoo_model.model),
        [["conv1", "bn1"], ["layer1.conv1", "layer1.bn1"], ["layer1.conv2", "layer1.bn2"], ["down", "down_bn"],
         ["layer2.conv1", "layer2.bn1"], ["layer2.conv2", "layer2.bn2"]],
    )
    quant = prepare_qat_fx(
        copy.deepcopy(zoo_model.model).train(), tq.get_default_qat_qconfig_mapping("fbgemm"), zoo_model.example_inputs()
    )
    collect_logits(quant, get_loaders("digits", zoo_model.spec, batch_size=128, calib_batches=2).calib, "cpu")
    quant.apply(tq.disable_observer)
    result = per_layer_sqnr(fused, quant, loaders.test)
    assert set(result) == {"conv1", "layer1.conv1", "layer1.conv2", "down", "layer2.conv1", "layer2.conv2", "fc"}
    assert type(quant.conv1).__name__ == "ConvBnReLU2d"
    assert all(20.0 < value < 80.0 for value in result.values()), result


def test_collect_logits_and_evaluate_dataset():
    model = nn.Linear(3, 4)
    model.train()
    inputs = torch.randn(10, 3)
    labels = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2, 3, -1])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=4)
    result = evaluate_dataset(model, loader, "cpu")
    assert model.training
    with torch.no_grad():
        expected = model(inputs)
    torch.testing.assert_close(result.logits, expected)
    assert result.labels.tolist() == labels.tolist()
    assert result.num_samples == 10 and result.num_labeled == 8
    assert result.top1 == topk_accuracy(expected, labels, k=1)
    assert result.top5 == topk_accuracy(expected, labels, k=4) == 1.0
    unlabeled = evaluate_dataset(model, [inputs[:4], inputs[4:]], "cpu")
    assert unlabeled.top1 is None and unlabeled.num_labeled == 0


def _printed_predictions(text: str) -> list[tuple[str, float]]:
    lines = text.strip().splitlines()
    assert lines[0] == "Evaluation:"
    pairs = []
    for line in lines[1:]:
        match = re.fullmatch(r"(.+) (\S+)", line)
        pairs.append((match.group(1), float(match.group(2))))
    return pairs


def test_evaluate_prints_top5_like_the_seeds(capsys):
    zoo_model = get_model("resnet18", seed=0)
    result = evaluate(zoo_model.model, "cpu")
    printed = _printed_predictions(capsys.readouterr().out)
    assert result.sample == "grace_hopper" and len(printed) == 5
    probabilities = torch.softmax(result.logits.double(), dim=0)
    top = probabilities.topk(5)
    categories = zoo_model.labels
    assert [label for label, _ in printed] == [categories[i] for i in top.indices.tolist()]
    np.testing.assert_allclose([p for _, p in printed], top.values.numpy(), rtol=1e-5)
    assert [p.label for p in result.predictions] == [label for label, _ in printed]
    assert not zoo_model.model.training


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Please use quant_min:UserWarning")
def test_evaluate_runs_an_fx_fake_quant_model_and_keeps_its_mode(capsys):
    from eqcore._torch_ao import prepare_qat_fx, tq

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 7, stride=8)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 1000)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))

    torch.manual_seed(0)
    prepared = prepare_qat_fx(Small().train(), tq.get_default_qat_qconfig_mapping("fbgemm"), (torch.randn(1, 3, 224, 224),))
    result = evaluate(prepared, "cpu", "grace_hopper", topk=3, print_results=False)
    assert len(result.predictions) == 3 and capsys.readouterr().out == ""
    assert prepared.training


def test_evaluate_by_label_name_or_file_and_clear_errors(tmp_path, capsys):
    zoo_model = get_model("mobilenet_v3_small")
    if len(sample_images()) > 1:
        assert evaluate(zoo_model, "cpu", "tabby", print_results=False).sample == "chelsea"
    image_file = tmp_path / "me.png"
    sample_images()[0].load().save(image_file)
    from_file = evaluate(zoo_model, "cpu", str(image_file), print_results=False)
    from_sample = evaluate(zoo_model, "cpu", "grace_hopper", print_results=False)
    torch.testing.assert_close(from_file.logits, from_sample.logits)
    with pytest.raises(EQError, match=r"'Samoyed'.*grace_hopper"):
        evaluate(zoo_model.model, "cpu", "Samoyed")
    with pytest.raises(EQError, match="digits"):
        evaluate(get_model("digits"), "cpu")
    spec = imagenet_spec(crop_size=299, resize_size=342)
    result = evaluate(zoo_model.model, "cpu", spec=spec, print_results=False)
    assert result.logits.shape == (1000,) and result.sample == "grace_hopper"
