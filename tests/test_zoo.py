"""Model zoo: names, seeded init, weights loading and its errors, the shipped digits model."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from eqcore.models.digits_data import digits_loaders
from eqcore.models.specs import imagenet_categories
from eqcore.errors import EQError
from eqcore.analysis.evaluate import evaluate_dataset
from eqcore.models.digits_net import DigitsNet, digits_weights_path
from eqcore.models.zoo import ZooModel, available_models, get_model


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_available_models_lists_every_torchvision_classifier_and_digits():
    names = available_models()
    classifiers = torchvision.models.list_models(module=torchvision.models)
    assert len(classifiers) > 50
    assert set(names) == {*classifiers, "digits"}
    assert names == sorted(names)
    assert {"resnet18", "inception_v3", "vit_b_16", "mobilenet_v3_small"} <= set(names)
    assert "fasterrcnn_resnet50_fpn" not in names and "fcn_resnet50" not in names


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone():
    rng_before = torch.get_rng_state()
    first = get_model("resnet18", seed=0)
    again = get_model("resnet18", weights="none", seed=0)
    other = get_model("resnet18", seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert _same_state(first.model, again.model)
    assert not torch.equal(first.model.conv1.weight, other.model.conv1.weight)
    assert first.weights == "none" and first.name == "resnet18"
    assert not first.model.training


def test_model_names_are_case_insensitive():
    assert get_model("ResNet18").name == "resnet18"


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b3", "inception_v3"])
def test_spec_follows_the_default_weights_transforms(name):
    zoo_model = get_model(name)
    transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    spec = zoo_model.spec
    assert spec.shape == (3, transform.crop_size[0], transform.crop_size[0])
    assert spec.resize_size == transform.resize_size[0]
    assert spec.interpolation == transform.interpolation.value
    assert spec.mean == tuple(transform.mean) and spec.std == tuple(transform.std)
    assert spec.labels == imagenet_categories() and len(spec.labels) == 1000
    assert spec.default_data == "samples"
    out = zoo_model.model(*zoo_model.example_inputs(1))
    assert out.shape == (1, 1000)


def test_inception_v3_takes_299_pixel_inputs():
    zoo_model = get_model("inception_v3")
    assert zoo_model.input_shape == (3, 299, 299)
    assert zoo_model.model.AuxLogits is None


def test_state_dict_file_roundtrip(tmp_path):
    source = get_model("resnet18", seed=3).model
    plain, wrapped, parallel = tmp_path / "plain.pth", tmp_path / "wrapped.pt", tmp_path / "parallel.pt"
    torch.save(source.state_dict(), plain)
    torch.save({"state_dict": source.state_dict()}, wrapped)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, parallel)
    for file in (plain, wrapped, parallel):
        loaded = get_model("resnet18", weights=file)
        assert _same_state(loaded.model, source)
        assert loaded.weights == str(file)
    assert not _same_state(get_model("resnet18", seed=0).model, source)


def _bad_weight_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    state = get_model("resnet18").model.state_dict()
    cases: dict[str, tuple[Path, str]] = {
        "missing": (tmp_path / "absent.pth", "does not exist"),
        "directory": (tmp_path, "not a file"),
    }
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    cases["not a mapping"] = (tmp_path / "list.pt", "not a state dict")
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "checkpoint.pt")
    cases["checkpoint with extras"] = (tmp_path / "checkpoint.pt", "not a state dict of tensors")
    (tmp_path / "garbage.pth").write_bytes(b"this is not a torch file")
    cases["garbage"] = (tmp_path / "garbage.pth", "weights_only=True")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    cases["pickled module"] = (tmp_path / "module.pt", "weights_only=True")
    torch.save({k: v for k, v in state.items() if k != "fc.bias"}, tmp_path / "missing_key.pt")
    cases["missing key"] = (tmp_path / "missing_key.pt", "missing keys ['fc.bias']")
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra_key.pt")
    cases["unexpected key"] = (tmp_path / "extra_key.pt", "unexpected keys ['extra.weight']")
    torch.save({**state, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, tmp_path / "head.pt")
    cases["shape mismatch"] = (tmp_path / "head.pt", "fc.weight: file (10, 512) vs model (1000, 512)")
    return cases


def test_each_bad_weights_file_gives_one_clear_error(tmp_path):
    for case, (file, phrase) in _bad_weight_files(tmp_path).items():
        with pytest.raises(EQError) as info:
            get_model("resnet18", weights=str(file))
        message = str(info.value)
        assert str(file) in message, case
        assert phrase in message, (case, message)
        assert "state" in message, case
        assert "Traceback" not in message


def test_torchvision_weights_without_network_say_to_pass_a_local_file(tmp_path, monkeypatch):
    """Real download attempts: the hub cache is an empty tmp dir and HTTP(S) goes to a dead proxy
    (this machine is offline anyway), so torchvision's download genuinely fails."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert Path(torch.hub.get_dir()).is_relative_to(tmp_path)
    for name, weights in [("squeezenet1_1", "DEFAULT"), ("squeezenet1_1", "SqueezeNet1_1_Weights.IMAGENET1K_V1")]:
        with pytest.raises(EQError) as info:
            get_model(name, weights=weights)
        message = str(info.value)
        assert "SqueezeNet1_1_Weights.IMAGENET1K_V1" in message
        assert "--eq-weights /path/to/weights.pth" in message and "weights=path" in message
        assert "download" in message
    checkpoints = tmp_path / "hub" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def test_unknown_weight_enums_list_the_valid_ones():
    with pytest.raises(EQError, match=r"no weights 'IMAGENET1K_V9'.*IMAGENET1K_V1"):
        get_model("resnet18", weights="IMAGENET1K_V9")
    with pytest.raises(EQError, match="not weights of model 'resnet18'"):
        get_model("resnet18", weights="ResNet34_Weights.IMAGENET1K_V1")


def test_unknown_model_suggests_close_names_and_how_to_list():
    with pytest.raises(EQError) as info:
        get_model("resnt18")
    message = str(info.value)
    assert "resnet18" in message and "available_models()" in message


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    module = tmp_path / "my_factories.py"
    module.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from eqcore.models.specs import InputSpec
            from eqcore.models.zoo import ZooModel

            def tiny():
                return nn.Sequential(nn.Flatten(), nn.Linear(3 * 224 * 224, 4))

            def with_spec():
                return nn.Sequential(nn.Flatten(), nn.Linear(12, 2))

            with_spec.eq_input_spec = InputSpec(
                shape=(3, 2, 2), mean=(0.5,) * 3, std=(0.5,) * 3, resize_size=2, crop_size=2, labels=("a", "b")
            )

            def zoo():
                model = nn.Linear(2, 2)
                return ZooModel(model=model, name="x", weights="none", spec=with_spec.eq_input_spec)

            def not_a_model():
                return 42

            def raises():
                raise RuntimeError("no weights here")
            """
        )
    )
    (tmp_path / "my_broken_factories.py").write_text("SIZE = 1 / 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_factories"
    sys.modules.pop("my_factories", None)


def test_factory_models(factory_module, tmp_path):
    plain = get_model(f"{factory_module}:tiny", seed=5)
    assert plain.spec.shape == (3, 224, 224) and len(plain.labels) == 1000
    assert plain.name == f"{factory_module}:tiny" and not plain.model.training
    assert _same_state(plain.model, get_model(f"{factory_module}:tiny", seed=5).model)
    assert get_model(f"{factory_module}:with_spec").spec.labels == ("a", "b")
    zoo = get_model(f"{factory_module}:zoo")
    assert isinstance(zoo, ZooModel) and zoo.name == f"{factory_module}:zoo"
    file = tmp_path / "tiny.pt"
    torch.save(plain.model.state_dict(), file)
    assert _same_state(get_model(f"{factory_module}:tiny", weights=file, seed=9).model, plain.model)


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
        ("{m}:missing", "has no attribute 'missing'"),
        ("{m}:not_a_model", "returned a int"),
        ("{m}:raises", r"^model 'my_factories:raises': the factory raises\(\) raised RuntimeError: no weights here$"),
        ("my_broken_factories:make", r"importing 'my_broken_factories' raised ZeroDivisionError: division by zero$"),
    ],
)
def test_factory_errors(factory_module, name, phrase):
    with pytest.raises(EQError, match=phrase):
        get_model(name.format(m=factory_module))


def test_shipped_digits_weights_are_small_float32_and_load_safely():
    file = digits_weights_path()
    assert file.is_file() and file.stat().st_size < 512 * 1024
    state = torch.load(file, map_location="cpu", weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    zoo_model = get_model("digits")
    assert zoo_model.weights == "none" and zoo_model.spec.shape == (1, 8, 8)
    assert zoo_model.default_data == "digits" and zoo_model.labels == tuple("0123456789")
    assert _same_state(get_model("digits", weights="DEFAULT").model, zoo_model.model)
    with pytest.raises(EQError, match="no torchvision weights enum"):
        get_model("digits", weights="IMAGENET1K_V1")


def test_digits_float_accuracy_on_held_out_split():
    zoo_model = get_model("digits")
    result = evaluate_dataset(zoo_model.model, digits_loaders(zoo_model.spec).test, "cpu")
    assert result.num_samples == result.num_labeled == 450
    assert result.top1 >= 0.97


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Please use quant_min:UserWarning")
def test_digits_model_is_fx_traceable_and_prepares_for_qat():
    from eqcore._torch_ao import prepare_qat_fx, tq

    zoo_model = get_model("digits")
    (example,) = zoo_model.example_inputs(4)
    traced = torch.fx.symbolic_trace(zoo_model.model)
    torch.testing.assert_close(traced(example), zoo_model.model(example), rtol=0, atol=0)
    assert any(node.target is torch.flatten for node in traced.graph.nodes)
    prepared = prepare_qat_fx(DigitsNet().train(), tq.get_default_qat_qconfig_mapping("fbgemm"), (example,))
    assert prepared(example).shape == (4, 10)
    fused_types = {type(m).__name__ for m in prepared.modules()}
    assert {"ConvBnReLU2d", "ConvBn2d"} <= fused_types


def _hub_cache_file(tmp_path: Path, weights_enum) -> Path:
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints / weights_enum.url.rsplit("/", 1)[1]


def test_torchvision_weights_already_in_the_hub_cache_load_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    source = get_model("squeezenet1_1", seed=11).model
    torch.save(source.state_dict(), _hub_cache_file(tmp_path, enum))
    for weights in ("DEFAULT", "IMAGENET1K_V1", "SqueezeNet1_1_Weights.IMAGENET1K_V1"):
        loaded = get_model("squeezenet1_1", weights=weights)
        assert _same_state(loaded.model, source)
        assert loaded.weights_enum == "SqueezeNet1_1_Weights.IMAGENET1K_V1"
        assert loaded.spec.shape == (3, 224, 224) and not loaded.model.training
    assert get_model("squeezenet1_1", weights="DEFAULT").weights == "DEFAULT"


def test_corrupt_hub_cache_file_is_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = _hub_cache_file(tmp_path, torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1)
    cached.write_bytes(b"truncated download")
    with pytest.raises(EQError) as info:
        get_model("squeezenet1_1", weights="DEFAULT")
    assert str(cached) in str(info.value) and "--eq-weights" in str(info.value)
