"""Models by name: every torchvision classification model, the built-in ``digits`` model,
``timm:<name>`` (`eqcore.models.timm_zoo`), ``hf:<config>`` (`eqcore.models.hf_zoo`), or a
user's ``package.module:callable`` factory, each with the input spec its data must follow.

Weights (``weights=`` / ``--eq-weights``):

- ``"none"``: seeded random init (``seed``), deterministic; for ``digits`` it is the shipped
  trained weights (``eqcore/assets/digits.pt``), since that model is only useful trained. Seeded
  torchvision models then get ``eqcore.models.seeding``'s two rules, so their logits vary with the
  input: all-zero heads re-initialised (vit_b_16), BatchNorm statistics from seeded noise
  (efficientnet_b0's logits would otherwise be 1e-14);
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from eqcore.errors import EQError
from eqcore.models.digits_net import DigitsNet, digits_weights_path
from eqcore.models.seeding import seed_informative
from eqcore.models.specs import InputSpec, digits_spec, imagenet_spec
from eqcore.models.weights import _is_weights_path, _load_into, load_state_dict_file, load_weights_file

__all__ = [
    "ZooModel",
    "available_models",
    "get_model",
]

DIGITS = "digits"
_AUX_MODELS = ("googlenet", "inception_v3")
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")
SEEDING_BATCH = 2  # seeded noise images that set a seeded model's BatchNorm statistics


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


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    """Every torchvision classification model name plus "digits", sorted."""
    return sorted([*_torchvision_names(), DIGITS])


def _unknown_model(name: str) -> EQError:
    close = difflib.get_close_matches(name.lower(), available_models(), n=5, cutoff=0.6)
    suggestion = f" Did you mean {', '.join(close)}?" if close else ""
    return EQError(
        f"unknown model {name!r}.{suggestion} Models are torchvision classification names, 'digits', "
        "'timm:<name>', 'hf:<bert-tiny | vit-tiny | path/to/config.json>' or 'package.module:callable'; "
        "list the torchvision ones with "
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
    prefixed = _prefixed_model(name, weights_text, seed=seed)
    if prefixed is not None:
        zoo_model = prefixed
    elif ":" in name and not os.path.exists(name):
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


def _prefixed_model(name: str, weights: str, *, seed: int) -> ZooModel | None:
    """``timm:<name>`` and ``hf:<config>`` models; None for any other name."""
    if name.startswith("timm:"):
        from eqcore.models.timm_zoo import timm_model as build
    elif name.startswith("hf:"):
        from eqcore.models.hf_zoo import hf_model as build
    else:
        return None
    model, spec, canonical = build(name, weights, seed=seed)
    if canonical == "none":  # seeded init, not loaded weights: make its outputs carry signal
        # transformers' fixed-std init (0.02) shrinks every projection at small widths
        seed_informative(model, spec.example_inputs(SEEDING_BATCH, seed=seed), seed=seed,
                         variance_preserving=name.startswith("hf:"))
    return ZooModel(model=model, name=name, weights=canonical, spec=spec)


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
    spec = _spec_from_enum(default)
    if state is not None:
        if name in _AUX_MODELS:
            state = {k: v for k, v in state.items() if not k.startswith(_AUX_PREFIXES)}
        _load_into(model, state, file=weights, model_name=name)
    else:
        seed_informative(model, spec.example_inputs(SEEDING_BATCH, seed=seed), seed=seed)
    return ZooModel(model=model, name=name, weights=weights if from_file else "none", spec=spec)


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
    except Exception as exc:  # the user's module failed while importing: its own message, not ours
        raise EQError(f"model {name!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    factory: Any = module
    for part in attr_path.split("."):
        if not hasattr(factory, part):
            raise EQError(f"model {name!r}: module {module_name!r} has no attribute {attr_path!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise EQError(f"model {name!r}: {attr_path!r} is not callable; it must be a no-argument model factory")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built = factory()
    except Exception as exc:  # the user's factory failed: its own message, not a traceback through us
        raise EQError(f"model {name!r}: the factory {attr_path}() raised {type(exc).__name__}: {exc}") from exc
    if isinstance(built, ZooModel):
        zoo_model = built
    elif isinstance(built, nn.Module):
        spec = next(
            (s for s in (getattr(o, "eq_input_spec", None) for o in (built, factory, module)) if s is not None),
            None,
        )
        if spec is not None and not isinstance(spec, InputSpec):
            raise EQError(f"model {name!r}: eq_input_spec must be an eqcore.models.specs.InputSpec, got {type(spec).__name__}")
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
