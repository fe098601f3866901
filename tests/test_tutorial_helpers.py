"""The tutorials' helpers: the qconfig constructors and forward_and_backprop_an_image."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

import eqcore
import eqcore.quant.recipes as recipes
from eqcore import (
    EQError,
    EQFakeQuantize,
    EQLearnableFakeQuantize,
    fake_quant_act,
    fake_quant_weight,
    forward_and_backprop_an_image,
    learnable_act,
    learnable_weights,
)
from eqcore._torch_ao import QConfig, QConfigMapping, _LearnableFakeQuantize, prepare_qat_fx, tq
from eqcore.models.samples import find_sample

pytestmark = pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")


class TinyNet(nn.Module):
    """A small 3x224x224 classifier: conv -> BN -> ReLU -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


@dataclass
class LogitsOutput:
    """What a transformers ModelOutput looks like to us: an object with a ``logits`` tensor."""

    logits: torch.Tensor


class WrappedOutput(nn.Module):
    def __init__(self, inner: nn.Module, as_dict: bool) -> None:
        super().__init__()
        self.inner = inner
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> object:
        logits = self.inner(x)
        return {"logits": logits, "hidden": x} if self.as_dict else LogitsOutput(logits=logits)


class InputRecorder(nn.Module):
    """Records the batch it is fed, and returns a differentiable function of it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return (x * self.weight).flatten(1)[:, :10]


def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def tutorial_preprocess(image: Image.Image) -> torch.Tensor:
    """The tutorials' torchvision pipeline, written out as they write it."""
    return transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])(image).unsqueeze(0)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# The qconfig helpers


def test_helpers_import_from_eqcore_and_from_the_recipes_module() -> None:
    for name in ("learnable_act", "learnable_weights", "fake_quant_act", "fake_quant_weight"):
        assert getattr(eqcore, name) is getattr(recipes, name)
    assert eqcore.forward_and_backprop_an_image is forward_and_backprop_an_image


def test_learnable_act_is_the_tutorials_activation_quantizer() -> None:
    quantizer = learnable_act(range=2)()
    assert isinstance(quantizer, EQLearnableFakeQuantize)
    assert (quantizer.quant_min, quantizer.quant_max) == (0, 255)
    assert (quantizer.dtype, quantizer.qscheme) == (torch.quint8, torch.per_tensor_affine)
    assert isinstance(quantizer.activation_post_process, tq.HistogramObserver)
    assert quantizer.use_grad_scaling
    assert quantizer.scale.tolist() == pytest.approx([2 / 255]) and quantizer.zero_point.tolist() == [0.0]


def test_learnable_weights_is_the_tutorials_weight_quantizer() -> None:
    quantizer = learnable_weights(channels=6)()
    assert isinstance(quantizer, EQLearnableFakeQuantize)
    assert (quantizer.quant_min, quantizer.quant_max) == (-128, 127)
    assert (quantizer.dtype, quantizer.qscheme, quantizer.ch_axis) == (torch.qint8, torch.per_channel_symmetric, 0)
    assert isinstance(quantizer.activation_post_process, tq.PerChannelMinMaxObserver)
    assert quantizer.channel_len == 6 and quantizer.use_grad_scaling
    assert quantizer.scale.tolist() == pytest.approx([0.1] * 6) and quantizer.zero_point.tolist() == [0.0] * 6


def test_fake_quant_act_and_weight_are_non_learnable() -> None:
    act, weight = fake_quant_act(), fake_quant_weight()
    assert isinstance(act, EQFakeQuantize) and isinstance(weight, EQFakeQuantize)
    assert (act.quant_min, act.quant_max, act.qscheme) == (0, 255, torch.per_tensor_affine)
    assert isinstance(act.activation_post_process, tq.HistogramObserver)
    assert (weight.quant_min, weight.quant_max, weight.qscheme) == (-128, 127, torch.per_channel_symmetric)
    assert isinstance(weight.activation_post_process, tq.PerChannelMinMaxObserver)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    y = weight(x)  # observes, then fake-quantizes per output channel with z = 0
    scale = x.abs().amax(dim=(1, 2, 3)) / 127.5
    assert torch.allclose(weight.scale, scale, rtol=1e-6)
    assert bool((weight.zero_point == 0).all())
    assert torch.equal(y, torch.fake_quantize_per_channel_affine(x, weight.scale, weight.zero_point, 0, -128, 127))


@pytest.mark.parametrize("kind", ["act", "weights"])
def test_helpers_match_the_tutorials_torch_quantizers(kind: str) -> None:
    """The tutorial's utils.qconfigs built torch's _LearnableFakeQuantize with the same arguments:
    after the same calibration the two give the same output, scale and zero point."""
    torch.manual_seed(1)
    x = torch.randn(6, 4, 7, 7) * 2
    if kind == "act":
        ours = learnable_act(range=2)()
        theirs = _LearnableFakeQuantize(
            observer=tq.HistogramObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
            qscheme=torch.per_tensor_affine, scale=2 / 255.0, zero_point=0.0, use_grad_scaling=True,
        )
    else:
        ours = learnable_weights(channels=6)()
        theirs = _LearnableFakeQuantize(
            observer=tq.PerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric, scale=0.1, zero_point=0.0, use_grad_scaling=True,
            channel_len=6,
        )
    ours.enable_static_estimate()
    theirs.enable_static_estimate()
    assert torch.equal(ours(x), theirs(x))
    assert torch.allclose(ours.scale, theirs.scale) and torch.equal(ours.zero_point, theirs.zero_point)


def test_helpers_work_in_a_qconfig_with_prepare_qat_fx_as_the_tutorial_uses_them() -> None:
    model = tiny_net().eval()
    mapping = QConfigMapping()
    for name, module in model.named_modules():
        if hasattr(module, "out_channels"):
            mapping.set_module_name(name, QConfig(
                activation=learnable_act(range=2), weight=learnable_weights(channels=module.out_channels),
            ))
    QConfig(activation=fake_quant_act, weight=fake_quant_weight)  # the tutorial's global qconfig
    prepared = prepare_qat_fx(model, mapping, (torch.randn(1, 3, 224, 224),))
    weight_quantizer = prepared.conv.weight_fake_quant
    assert isinstance(weight_quantizer, EQLearnableFakeQuantize) and weight_quantizer.channel_len == 4
    acts = [m for n, m in prepared.named_modules() if n.startswith("activation_post_process") and "." not in n]
    assert acts and all(isinstance(m, EQLearnableFakeQuantize) for m in acts)
    out = prepared(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 10) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_learnable_act_rejects_a_bad_range(bad: object) -> None:
    with pytest.raises(EQError, match="learnable_act: range must be a positive number"):
        learnable_act(range=bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", None])
def test_learnable_weights_rejects_bad_channels(bad: object) -> None:
    with pytest.raises(EQError, match="learnable_weights: channels must be a positive int"):
        learnable_weights(channels=bad)


# forward_and_backprop_an_image


def test_default_image_is_the_built_in_cat_preprocessed_as_the_tutorials_do() -> None:
    pytest.importorskip("skimage")
    recorder = InputRecorder()
    result = forward_and_backprop_an_image(recorder)
    assert result.sample == "chelsea"
    expected = tutorial_preprocess(find_sample("chelsea").load())
    assert recorder.seen[0].shape == (1, 3, 224, 224)
    assert torch.allclose(recorder.seen[0], expected, atol=1e-6)
    assert recorder.weight.grad is not None


def test_image_may_be_a_path_or_a_pil_image(tmp_path) -> None:  # noqa: ANN001
    picture = Image.fromarray(
        (torch.rand(300, 260, 3, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8).numpy()
    )
    path = tmp_path / "photo.png"
    picture.save(path)
    for image in (path, str(path), picture):
        recorder = InputRecorder()
        result = forward_and_backprop_an_image(recorder, image)
        assert torch.allclose(recorder.seen[0], tutorial_preprocess(picture), atol=1e-6)
        assert result.logits.shape == (1, 10)


def test_one_forward_and_the_mean_of_the_output_backpropagated() -> None:
    model = tiny_net()
    image = find_sample("grace_hopper").load()
    result = forward_and_backprop_an_image(model, image)
    reference = tiny_net()
    reference(tutorial_preprocess(image)).mean().backward()
    ours, theirs = gradients(model), gradients(reference)
    assert ours.keys() == theirs.keys() == {name for name, _ in model.named_parameters()}
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-7), name
    assert result.loss == pytest.approx(float(result.logits.mean()), rel=1e-6)
    assert model.training  # the mode is left as it was


def test_fx_prepared_model_gets_gradients_on_every_parameter() -> None:
    model = tiny_net().eval()
    mapping = QConfigMapping().set_module_name(
        "conv", QConfig(activation=learnable_act(range=2), weight=learnable_weights(channels=4))
    )
    prepared = prepare_qat_fx(model, mapping, (torch.randn(1, 3, 224, 224),))
    forward_and_backprop_an_image(prepared, find_sample("grace_hopper").load())
    missing = [name for name, p in prepared.named_parameters() if p.grad is None]
    assert not missing, missing


def test_torch_export_module() -> None:
    """PT2E prepares a ``torch.export``-ed model's ``.module()``: the helper runs on one as on eager."""
    image = find_sample("grace_hopper").load()
    exported = torch.export.export(tiny_net().eval(), (torch.randn(1, 3, 224, 224),)).module()
    forward_and_backprop_an_image(exported, image)
    eager = tiny_net().eval()
    forward_and_backprop_an_image(eager, image)
    ours, theirs = gradients(exported), gradients(eager)
    assert len(ours) == len(theirs) == len(list(eager.parameters()))
    for name, grad in theirs.items():
        assert torch.allclose(ours[name], grad, atol=1e-7), name


@pytest.mark.parametrize("as_dict", [False, True])
def test_outputs_with_logits(as_dict: bool) -> None:
    image = find_sample("grace_hopper").load()
    wrapped = WrappedOutput(tiny_net(), as_dict=as_dict)
    result = forward_and_backprop_an_image(wrapped, image)
    plain = tiny_net()
    forward_and_backprop_an_image(plain, image)
    assert result.logits.shape == (1, 10)
    for name, grad in gradients(plain).items():
        assert torch.allclose(wrapped.inner.get_parameter(name).grad, grad, atol=1e-7), name


def test_a_zoo_model_uses_its_own_input_spec() -> None:
    zoo = eqcore.get_model("digits")
    recorder = InputRecorder()
    zoo_like = eqcore.ZooModel(model=recorder, name="digits", weights="none", spec=zoo.spec)
    forward_and_backprop_an_image(zoo_like, find_sample("grace_hopper").load())
    assert recorder.seen[0].shape == (1, 1, 8, 8)


def test_clear_errors() -> None:
    model = tiny_net()
    with pytest.raises(EQError, match="does not require grad"), torch.no_grad():
        forward_and_backprop_an_image(model)
    with pytest.raises(EQError, match="image file .*missing.png.* does not exist"):
        forward_and_backprop_an_image(model, "missing.png")
    with pytest.raises(EQError, match="no built-in sample image"):
        forward_and_backprop_an_image(model, "no-such-sample")
    with pytest.raises(EQError, match="image must be None"):
        forward_and_backprop_an_image(model, 42)
    with pytest.raises(EQError, match="model must be an nn.Module"):
        forward_and_backprop_an_image(lambda x: x)
    with pytest.raises(EQError, match="returned a str"):
        forward_and_backprop_an_image(WrappedStr())


class WrappedStr(nn.Module):
    def forward(self, x: torch.Tensor) -> str:
        return "not logits"
