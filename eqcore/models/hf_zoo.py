"""``hf:<name>``: Hugging Face transformers models from built-in tiny configs or a config.json.

Built-in configs (seeded random init, offline): ``hf:bert-tiny`` (a BERT encoder for sequence
classification: 2 layers, hidden 128, 2 heads, the architecture of prajjwal1/bert-tiny) and
``hf:vit-tiny`` (an image classifier with DeiT-tiny's architecture: 12 layers, hidden 192).
``hf:path/to/config.json`` builds a user's own config (a text model unless the config describes
images). ``--eq-weights DEFAULT`` loads the pretrained weights with ``from_pretrained`` (the
hub repository of a built-in, or the config's directory): that needs internet or a filled cache.

The model is wrapped so that it takes one tensor, as every eqcore stage feeds it, and returns
the logits of its ``ModelOutput``: token ids (attention mask = ids != pad id) or pixel values.
Seeded (``none``) models then get their linear layers at ``N(0, 1/fan_in)`` from
``eqcore.models.seeding`` (``get_model`` asks for it): transformers' own 0.02 std leaves
hf:bert-tiny's logits nearly the same for every sentence.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eqcore.errors import EQError
from eqcore.models.specs import imagenet_categories, imagenet_spec
from eqcore.models.tokens import TokenSpec
from eqcore.models.weights import _is_weights_path, load_weights_file

__all__ = ["BUILTIN_CONFIGS", "PREFIX", "ImageLogits", "TextLogits", "hf_model", "require_hub"]

PREFIX = "hf:"
TEXT_SEQ_LEN = 32


@dataclass(frozen=True)
class _Builtin:
    """A built-in config: its model type, its settings, and the hub repository of its weights."""

    kind: str  # "text" or "image"
    model_type: str
    settings: dict[str, Any] = field(default_factory=dict)
    hub_id: str = ""


BUILTIN_CONFIGS: dict[str, _Builtin] = {
    "bert-tiny": _Builtin(
        "text", "bert",
        dict(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=512, max_position_embeddings=512, num_labels=2),
        hub_id="prajjwal1/bert-tiny",
    ),
    "vit-tiny": _Builtin(
        "image", "vit",
        dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
             image_size=224, patch_size=16, num_labels=1000),
        hub_id="facebook/deit-tiny-patch16-224",
    ),
}


class TextLogits(nn.Module):
    """A transformers sequence classifier as ``forward(input_ids) -> logits``."""

    def __init__(self, model: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.model = model
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=(input_ids != self.pad_id).long()).logits


class ImageLogits(nn.Module):
    """A transformers image classifier as ``forward(pixel_values) -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


HUB_HOST = "huggingface.co"


def require_hub(what: str) -> None:
    """EQError at once when the Hugging Face hub's name does not resolve (no internet), instead
    of huggingface_hub's minutes of retries."""
    try:
        socket.getaddrinfo(HUB_HOST, 443)
    except OSError as exc:
        raise EQError(
            f"{what} needs the Hugging Face hub, and {HUB_HOST} cannot be reached ({exc}); without internet "
            "use --eq-weights none (seeded init) or a local state-dict file"
        ) from exc


def _transformers() -> Any:
    from eqcore._torchao import quiet_imports

    try:
        with quiet_imports():
            import transformers
    except ImportError as exc:
        raise EQError(
            "hf: models need the transformers package; install it with pip install transformers "
            '(or pip install "pytest-easyquant[models]")'
        ) from exc
    transformers.logging.set_verbosity_error()
    return transformers


def _config(name: str, source: str) -> tuple[Any, str, str]:
    """(config, kind, where pretrained weights come from) for a built-in name or a config path."""
    builtin = BUILTIN_CONFIGS.get(source)
    if builtin is not None:
        config = _transformers().AutoConfig.for_model(builtin.model_type, **builtin.settings)
        return config, builtin.kind, builtin.hub_id
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise EQError(
            f"hf config {source!r} is neither a built-in config ({', '.join(BUILTIN_CONFIGS)}) "
            "nor an existing config.json; pass hf:bert-tiny, hf:vit-tiny or hf:path/to/config.json"
        )
    transformers = _transformers()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        config = transformers.AutoConfig.for_model(**data)
    except Exception as exc:
        raise EQError(
            f"hf config {str(path)!r} is not a transformers config ({type(exc).__name__}: {exc}); "
            "it needs a known \"model_type\" (e.g. \"bert\") and that model's settings"
        ) from exc
    kind = "image" if hasattr(config, "image_size") and hasattr(config, "num_channels") else "text"
    return config, kind, str(path.parent)


def _labels(config: Any) -> tuple[str, ...]:
    count = int(getattr(config, "num_labels", 2))
    if count == len(imagenet_categories()):
        return imagenet_categories()
    id2label = getattr(config, "id2label", None) or {}
    return tuple(str(id2label.get(i, id2label.get(str(i), i))) for i in range(count))


def _build(config: Any, kind: str, hub_id: str, *, pretrained: bool, name: str) -> nn.Module:
    transformers = _transformers()
    auto = (
        transformers.AutoModelForImageClassification if kind == "image"
        else transformers.AutoModelForSequenceClassification
    )
    if not pretrained:
        try:
            return auto.from_config(config)
        except Exception as exc:
            raise EQError(
                f"{name}: transformers cannot build a {'image' if kind == 'image' else 'sequence'} "
                f"classifier from this config ({type(exc).__name__}: {exc})"
            ) from exc
    try:
        return auto.from_pretrained(hub_id, config=config, local_files_only=True)
    except Exception:  # not in the local cache: download
        require_hub(f"{name} with --eq-weights DEFAULT")
    try:
        return auto.from_pretrained(hub_id, config=config)
    except Exception as exc:
        raise EQError(
            f"{name}: from_pretrained({hub_id!r}) failed ({type(exc).__name__}: {exc}); it needs "
            "internet or the weights in the local cache. Without them, use --eq-weights none (seeded init) "
            "or a state-dict file"
        ) from exc


def hf_model(name: str, weights: str, *, seed: int) -> tuple[nn.Module, Any, str]:
    """(wrapped model, input spec, canonical weights) for ``hf:<builtin | config.json>``."""
    source = name[len(PREFIX):].strip()
    pretrained = weights.upper() == "DEFAULT"
    if weights.lower() != "none" and not pretrained and not _is_weights_path(weights):
        raise EQError(
            f"weights {weights!r} for {name!r}: use 'none' (seeded init), 'DEFAULT' (from_pretrained, "
            "needs internet) or a state-dict file path"
        )
    from eqcore._torchao import quiet_imports

    with quiet_imports(), torch.random.fork_rng(devices=[]):  # transformers imports lazily
        config, kind, hub_id = _config(name, source)
        torch.manual_seed(seed)
        model = _build(config, kind, hub_id, pretrained=pretrained, name=name)
    labels = _labels(config)
    if kind == "image":
        size = int(config.image_size)
        mean = getattr(config, "image_mean", None) or (0.5,) * int(config.num_channels)
        std = getattr(config, "image_std", None) or (0.5,) * int(config.num_channels)
        spec: Any = imagenet_spec(crop_size=size, resize_size=int(round(size / 0.875)), interpolation="bicubic",
                                  mean=mean, std=std)
        from dataclasses import replace

        spec = replace(spec, labels=labels)
        wrapped: nn.Module = ImageLogits(model)
    else:
        pad_id = int(getattr(config, "pad_token_id", None) or 0)
        first = 101 if config.model_type == "bert" and config.vocab_size > 101 else None
        length = min(TEXT_SEQ_LEN, int(getattr(config, "max_position_embeddings", TEXT_SEQ_LEN)))
        spec = TokenSpec(seq_len=length, vocab_size=int(config.vocab_size), labels=labels, pad_id=pad_id,
                         first_id=first, low_id=min(1000, int(config.vocab_size) - 1) if first else pad_id + 1)
        wrapped = TextLogits(model, pad_id)
    canonical = "DEFAULT" if pretrained else "none"
    if weights.lower() != "none" and not pretrained:
        load_weights_file(model, weights, model_name=name)
        canonical = weights
    return wrapped.eval(), spec, canonical
