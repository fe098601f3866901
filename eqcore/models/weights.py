"""State-dict weight files: loading them safely and fitting them strictly into a model.

A file is read with ``torch.load(weights_only=True)`` and loaded with
``load_state_dict(strict=True)``; every failure is an EQError that says what does not fit.
``_is_weights_path`` tells a file path from a torchvision weights enum name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from eqcore.errors import EQError

__all__ = [
    "load_state_dict_file",
    "load_weights_file",
]

_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl", ".safetensors")
_ENUM_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9_]*\.)?[A-Z][A-Z0-9_]*$")


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
