"""Models by name: every torchvision classification model, the built-in ``digits`` model, or a
user's ``package.module:callable`` factory, each with the input spec its data must follow.

Weights (``weights=`` / ``--eq-weights``):

- ``"none"``: seeded random init (``seed``), deterministic; for ``digits`` it is the shipped
  trained weights (``eqcore/assets/digits.pt``), since that model is only useful trained;
- ``"DEFAULT"`` or an enum name (``"ResNet18_Weights.IMAGENET1K_V1"`` or ``"IMAGENET1K_V1"``):
  torchvision's download into torch.hub's cache (a file already cached there loads offline);
  without internet it fails with an EQError that says to pass a local state-dict file instead;
- a path: a state dict saved with ``torch.save(model.state_dict(), path)``, loaded with
  ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)``.

A factory ``"package.module:callable"`` is called with no arguments (under ``seed``) and returns
an nn.Module or a ZooModel. For a bare module the input spec is the first ``eq_input_spec``
attribute (an InputSpec) found on the returned model, the callable, or the module; without one it
is ImageNet's 3x224x224 (resize 256, ImageNet mean/std and labels).

torchvision specifics: crop/resize sizes, interpolation, mean/std and labels come from the chosen
weights enum's transforms, or the DEFAULT enum's for "none" and files (inception_v3 gets 299).
googlenet and inception_v3 are built without aux heads (they only matter in training), and with
torchvision's ``transform_input`` when loading a file (ImageNet weights expect it); ViTs are built
at the DEFAULT weights' image size (vit_h_14: 518).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from eqcore.models.data import InputSpec, digits_spec, imagenet_spec
from eqcore.errors import EQError

__all__ = [
    "DigitsNet",
    "InputSpec",
    "ZooModel",
    "available_models",
    "digits_weights_path",
    "get_model",
    "load_state_dict_file",
    "load_weights_file",
]

DIGITS = "digits"
_AUX_MODELS = ("googlenet", "inception_v3")
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")
_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".safetensors")
_ENUM_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9_]*\.)?[A-Z][A-Z0-9_]*$")


@dataclass
class ZooModel:
    """A model (in eval mode) with the name and weights it was built from and its input spec.

    ``weights`` is the canonical weights choice: "none", "DEFAULT", the full enum name, or the path
    as given; ``weights_enum`` is the resolved torchvision enum ("DEFAULT" resolved) when one was used.
    """

    model: nn.Module
    name: str
    weights: str
    spec: InputSpec
    weights_enum: str | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.spec.shape

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    @property
    def default_data(self) -> str:
        return self.spec.default_data

    def example_inputs(self, batch_size: int = 1, *, seed: int = 0) -> tuple[torch.Tensor]:
        """A seeded random input batch, e.g. for ``prepare_qat_fx(model, mapping, example_inputs)``."""
        return self.spec.example_inputs(batch_size, seed=seed)


class _DigitsBlock(nn.Module):
    """Residual block: conv-bn-relu-conv-bn, identity add, relu (one ReLU module per use)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + x)


class DigitsNet(nn.Module):
    """Small residual CNN for 1x8x8 digits: stem, residual block, stride-2 conv, residual block,
    global average pool, linear. FX-traceable, with the conv-bn(-relu) patterns that fusion and
    ``prepare_qat_fx`` look for, so it exercises the whole quantization path in seconds.
    """

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = _DigitsBlock(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * width)
        self.down_relu = nn.ReLU()
        self.layer2 = _DigitsBlock(2 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.down_relu(self.down_bn(self.down(x)))
        x = self.layer2(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def digits_weights_path() -> Path:
    """Where the shipped digits weights live (written by ``scripts/train_digits.py``)."""
    return Path(str(resources.files("eqcore").joinpath("assets", "digits.pt")))


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    """Every torchvision classification model name plus "digits", sorted."""
    return sorted([*_torchvision_names(), DIGITS])


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load and check a state-dict file safely (``weights_only=True``); EQError says what is wrong.

    A lone top-level "state_dict" or "model" key is unwrapped, and a "module." prefix on every key
    (from DataParallel) is stripped.
    """
    file = Path(path).expanduser()
    save_hint = "save one with torch.save(model.state_dict(), path)"
    if not file.exists():
        raise EQError(f"weights file {str(file)!r} does not exist; pass an existing state-dict file ({save_hint})")
    if not file.is_file():
        raise EQError(f"weights path {str(file)!r} is not a file; pass a state-dict file ({save_hint})")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EQError(
            f"cannot load weights file {str(file)!r} with torch.load(weights_only=True) "
            f"({type(exc).__name__}): it is not a torch.save file of plain tensors. It must be a state "
            f"dict ({save_hint}); pickled modules and other objects are not loaded, for safety"
        ) from exc
    if isinstance(loaded, Mapping) and len(loaded) == 1:
        (key, value), = loaded.items()
        if key in ("state_dict", "model") and isinstance(value, Mapping):
            loaded = value
    if not isinstance(loaded, Mapping):
        raise EQError(
            f"weights file {str(file)!r} holds a {type(loaded).__name__}, not a state dict (a mapping "
            f"from parameter names to tensors); {save_hint}"
        )
    bad = [str(k) for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not loaded:
        detail = f"entries that are not tensors: {bad[:5]}" if bad else "it is empty"
        raise EQError(
            f"weights file {str(file)!r} is not a state dict of tensors ({detail}); if it is a training "
            f"checkpoint, save the model's state dict alone ({save_hint})"
        )
    state = dict(loaded)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights_file(model: nn.Module, file: str | Path, *, model_name: str) -> None:
    """Load a state-dict file into ``model`` strictly; EQError in one line naming what does not fit."""
    _load_into(model, load_state_dict_file(file), file=str(file), model_name=model_name)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], *, file: str, model_name: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys {missing[:5]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys {unexpected[:5]}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches {mismatched[:5]}")
        raise EQError(
            f"weights file {file!r} does not fit model {model_name!r}: {'; '.join(problems)}. Pass a "
            f"state dict saved from this exact architecture (torch.save(model.state_dict(), path)); "
            "for a changed head or layers, load it through your own 'package.module:callable' factory"
        )
    model.load_state_dict(state, strict=True)


def _is_weights_path(weights: str) -> bool:
    if os.path.exists(weights) or weights.lower().endswith(_WEIGHT_FILE_SUFFIXES):
        return True
    return os.sep in weights or "/" in weights or not _ENUM_NAME.match(weights)


def _unknown_model(name: str) -> EQError:
    close = difflib.get_close_matches(name.lower(), available_models(), n=5, cutoff=0.6)
    suggestion = f" Did you mean {', '.join(close)}?" if close else ""
    return EQError(
        f"unknown model {name!r}.{suggestion} Models are torchvision classification names, 'digits', "
        "or 'package.module:callable'; list them with "
        "python -c \"import eqcore; print(eqcore.available_models())\""
    )


def get_model(name: str, weights: str | Path = "none", *, seed: int = 0) -> ZooModel:
    """Build model ``name`` with ``weights`` (see the module docstring) in eval mode.

    ``seed`` seeds random init (in a forked RNG, so the caller's global RNG state is untouched).
    Raises EQError for unknown names and for weights that cannot be found, downloaded or loaded.
    """
    weights_text = str(weights).strip()
    if not weights_text:
        raise EQError("weights must be 'none', 'DEFAULT', a torchvision weights enum name or a file path")
    if ":" in name and not os.path.exists(name):
        zoo_model = _from_factory(name, weights_text, seed=seed)
    elif name.strip().lower() == DIGITS:
        zoo_model = _digits(weights_text)
    else:
        canonical = {n.lower(): n for n in _torchvision_names()}.get(name.strip().lower())
        if canonical is None:
            raise _unknown_model(name)
        zoo_model = _torchvision(canonical, weights_text, seed=seed)
    zoo_model.model.eval()
    return zoo_model


def _digits(weights: str) -> ZooModel:
    model = DigitsNet()
    if weights.lower() in ("none", "default"):
        file = digits_weights_path()
        if not file.is_file():
            raise EQError(
                f"the shipped digits weights {str(file)!r} are missing; reinstall pytest-easyquant or "
                "recreate them with: python scripts/train_digits.py"
            )
        canonical = "none" if weights.lower() == "none" else "DEFAULT"
    elif _is_weights_path(weights):
        file = Path(weights).expanduser()
        canonical = weights
    else:
        raise EQError(
            f"weights {weights!r} for model 'digits': use 'none' (the shipped trained weights) or "
            "a state-dict file path; 'digits' has no torchvision weights enum"
        )
    load_weights_file(model, file, model_name=DIGITS)
    return ZooModel(model=model, name=DIGITS, weights=canonical, spec=digits_spec())


def _spec_from_enum(member: Any) -> InputSpec:
    transform = member.transforms()
    spec = imagenet_spec(
        crop_size=int(transform.crop_size[0]),
        resize_size=int(transform.resize_size[0]),
        interpolation=transform.interpolation.value,
        mean=transform.mean,
        std=transform.std,
    )
    return dataclasses.replace(spec, labels=tuple(member.meta["categories"]))


def _resolve_enum(name: str, weights: str) -> Any:
    from torchvision.models import get_model_weights, get_weight

    enum_cls = get_model_weights(name)
    members = ["DEFAULT", *(m.name for m in enum_cls)]
    if weights.upper() == "DEFAULT":
        return enum_cls.DEFAULT
    if "." in weights:
        try:
            member = get_weight(weights)
        except (ValueError, KeyError, AttributeError):
            member = None
        if member is None or type(member) is not enum_cls:
            raise EQError(
                f"weights {weights!r} are not weights of model {name!r}; use one of "
                f"{[f'{enum_cls.__name__}.{m}' for m in members]}, 'none', or a state-dict file path"
            )
        return member
    try:
        return enum_cls[weights]
    except KeyError:
        raise EQError(
            f"model {name!r} has no weights {weights!r}; use one of {members} "
            f"(or {enum_cls.__name__}.<name>), 'none', or a state-dict file path"
        ) from None


def _download(member: Any, *, name: str) -> Path:
    """Fetch the enum's file into torch.hub's cache (where torchvision looks), or raise EQError."""
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(urlparse(member.url).path)
    cached = hub_dir / filename
    if cached.is_file():
        return cached
    match = torch.hub.HASH_REGEX.search(filename)
    try:
        hub_dir.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(member.url, str(cached), match.group(1) if match else None, progress=False)
    except Exception as exc:
        full = f"{type(member).__name__}.{member.name}"
        raise EQError(
            f"downloading torchvision weights {full} for {name!r} from {member.url} failed "
            f"({type(exc).__name__}: {exc}). Without internet, pass a local state-dict file instead: "
            f"--eq-weights /path/to/weights.pth (Python: get_model({name!r}, weights=path)); create it "
            f"where you have internet with torch.save(torchvision.models.{name}(weights='{full}')"
            ".state_dict(), 'weights.pth')"
        ) from exc
    return cached


def _torchvision(name: str, weights: str, *, seed: int) -> ZooModel:
    from torchvision.models import get_model_builder, get_model_weights

    builder = get_model_builder(name)
    default = get_model_weights(name).DEFAULT
    if weights.lower() != "none" and not _is_weights_path(weights):
        member = _resolve_enum(name, weights)
        cached = _download(member, name=name)
        full = f"{type(member).__name__}.{member.name}"
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = builder(weights=member, progress=False)
        except Exception as exc:
            raise EQError(
                f"torchvision weights {full} for {name!r} could not be loaded from the cache file "
                f"{str(cached)!r} ({type(exc).__name__}: {exc}); delete that file to download it again, "
                "or pass a local state-dict file with --eq-weights /path/to/weights.pth"
            ) from exc
        canonical = "DEFAULT" if weights.upper() == "DEFAULT" else full
        return ZooModel(model=model, name=name, weights=canonical, spec=_spec_from_enum(member), weights_enum=full)

    from_file = weights.lower() != "none"
    state = load_state_dict_file(weights) if from_file else None
    kwargs: dict[str, Any] = {}
    if name in _AUX_MODELS:
        # Aux heads only train; pretrained ImageNet weights expect torchvision's input transform.
        kwargs.update(aux_logits=False, init_weights=not from_file, transform_input=from_file)
    if builder.__module__.endswith("vision_transformer"):
        kwargs["image_size"] = int(default.transforms().crop_size[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(weights=None, **kwargs)
    if state is not None:
        if name in _AUX_MODELS:
            state = {k: v for k, v in state.items() if not k.startswith(_AUX_PREFIXES)}
        _load_into(model, state, file=weights, model_name=name)
    return ZooModel(model=model, name=name, weights=weights if from_file else "none", spec=_spec_from_enum(default))


def _from_factory(name: str, weights: str, *, seed: int) -> ZooModel:
    module_name, _, attr_path = name.partition(":")
    if not module_name or not attr_path:
        raise EQError(f"model {name!r}: a factory must be written 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EQError(
            f"model {name!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); make it "
            "importable: install it, or add its directory to PYTHONPATH or pytest's 'pythonpath' ini option"
        ) from exc
    factory: Any = module
    for part in attr_path.split("."):
        if not hasattr(factory, part):
            raise EQError(f"model {name!r}: module {module_name!r} has no attribute {attr_path!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise EQError(f"model {name!r}: {attr_path!r} is not callable; it must be a no-argument model factory")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = factory()
    if isinstance(built, ZooModel):
        zoo_model = built
    elif isinstance(built, nn.Module):
        spec = next(
            (s for s in (getattr(o, "eq_input_spec", None) for o in (built, factory, module)) if s is not None),
            None,
        )
        if spec is not None and not isinstance(spec, InputSpec):
            raise EQError(f"model {name!r}: eq_input_spec must be an eqcore.models.data.InputSpec, got {type(spec).__name__}")
        zoo_model = ZooModel(model=built, name=name, weights="none", spec=spec or imagenet_spec())
    else:
        raise EQError(
            f"model {name!r}: the factory returned a {type(built).__name__}; it must return a "
            "torch.nn.Module or an eqcore.models.zoo.ZooModel"
        )
    zoo_model.name = name
    if weights.lower() == "none":
        return zoo_model
    if not _is_weights_path(weights):
        raise EQError(
            f"weights {weights!r} for factory model {name!r}: torchvision weight enums only apply to "
            "torchvision model names; use 'none' or a state-dict file path"
        )
    load_weights_file(zoo_model.model, weights, model_name=name)
    zoo_model.weights = weights
    return zoo_model
