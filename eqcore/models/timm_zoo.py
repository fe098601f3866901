"""``timm:<name>``: any timm model, built offline with seeded init, with its input spec.

Weights: ``none`` (seeded random init, timm's own initializers), ``DEFAULT`` (timm's pretrained
weights from the Hugging Face hub: needs internet or a filled cache), or a state-dict file.
The input spec (size, crop, interpolation, mean/std) comes from the model's pretrained config.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

import torch

from eqcore.errors import EQError
from eqcore.models.specs import imagenet_categories, imagenet_spec
from eqcore.models.weights import _is_weights_path, load_weights_file

__all__ = ["PREFIX", "timm_model"]

PREFIX = "timm:"


def _timm() -> Any:
    from eqcore._torchao import quiet_imports

    try:
        with quiet_imports():
            import timm
    except ImportError as exc:
        raise EQError(
            "timm: models need the timm package; install it with pip install timm "
            '(or pip install "pytest-easyquant[models]")'
        ) from exc
    return timm


@functools.lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    return tuple(_timm().list_models())


def _spec(model: torch.nn.Module) -> Any:
    config = _timm().data.resolve_data_config({}, model=model)
    _, height, width = config["input_size"]
    if height != width:
        raise EQError(f"timm model with a non-square input {height}x{width} is not supported yet")
    crop_pct = float(config.get("crop_pct") or 0.875)
    spec = imagenet_spec(
        crop_size=int(height),
        resize_size=int(round(height / crop_pct)),
        interpolation=str(config.get("interpolation") or "bilinear"),
        mean=config["mean"],
        std=config["std"],
    )
    classes = int(getattr(model, "num_classes", 0) or 0)
    if classes and classes != len(imagenet_categories()):
        from dataclasses import replace

        spec = replace(spec, labels=tuple(str(i) for i in range(classes)))
    return spec


def timm_model(name: str, weights: str, *, seed: int) -> tuple[torch.nn.Module, Any, str]:
    """(model, input spec, canonical weights) for ``timm:<name>``; EQError for unknown names."""
    model_name = name[len(PREFIX):].strip()
    if model_name not in _names():
        close = difflib.get_close_matches(model_name, _names(), n=5, cutoff=0.6)
        suggestion = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise EQError(
            f"unknown timm model {model_name!r}.{suggestion} List timm's models with "
            "python -c \"import timm; print(timm.list_models('*vit*'))\""
        )
    pretrained = weights.upper() == "DEFAULT"
    if weights.lower() != "none" and not pretrained and not _is_weights_path(weights):
        raise EQError(
            f"weights {weights!r} for {name!r}: use 'none' (seeded init), 'DEFAULT' (timm's pretrained "
            "weights, needs internet) or a state-dict file path"
        )
    from eqcore._torchao import quiet_imports

    timm = _timm()
    if pretrained:
        from eqcore.models.hf_zoo import require_hub

        config = getattr(timm.models, "get_pretrained_cfg", lambda _: None)(model_name)
        if config is None or getattr(config, "hf_hub_id", None):
            require_hub(f"{name} with --eq-weights DEFAULT")
    try:
        with quiet_imports(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(model_name, pretrained=pretrained)
    except Exception as exc:
        if not pretrained:
            raise EQError(f"timm could not build {model_name!r} ({type(exc).__name__}: {exc})") from exc
        raise EQError(
            f"downloading timm's pretrained weights for {model_name!r} failed ({type(exc).__name__}: {exc}); "
            "without internet, pass a local state-dict file: --eq-weights /path/to/weights.pth"
        ) from exc
    canonical = "DEFAULT" if pretrained else "none"
    if weights.lower() != "none" and not pretrained:
        load_weights_file(model, weights, model_name=name)
        canonical = weights
    return model.eval(), _spec(model), canonical
