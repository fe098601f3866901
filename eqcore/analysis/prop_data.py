"""The tutorials' ``forward_and_backprop_an_image``: one photo forward, ``output.mean()`` backward.

The seeds downloaded pytorch/hub's dog photo; here the default is a built-in photo of an animal
(scikit-image's tabby cat, or matplotlib's Grace Hopper portrait where scikit-image is missing),
so an SA pass runs offline. The gradients it leaves behind fill the SA hooks' backward
histograms and the weights' ``.grad`` that ``plot_quant_weight_hist(sensitivity_analysis=True)``
bins.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from eqcore.analysis.evaluate import _output_tensor, _sample_image
from eqcore.analysis.sa_run import _model_device
from eqcore.errors import EQError
from eqcore.models.specs import InputSpec, eval_transform, imagenet_spec
from eqcore.models.zoo import ZooModel

__all__ = ["BackpropResult", "default_backprop_sample", "forward_and_backprop_an_image"]


@dataclass(frozen=True)
class BackpropResult:
    """What one ``forward_and_backprop_an_image`` call did: the image, its logits, the loss."""

    sample: str
    logits: torch.Tensor = field(repr=False)
    loss: float


def default_backprop_sample() -> str:
    """The built-in photo used when no image is given: an animal where scikit-image is installed."""
    return "chelsea" if importlib.util.find_spec("skimage") is not None else "grace_hopper"


def _image(image: str | Path | Image.Image | None) -> tuple[str, Image.Image]:
    if isinstance(image, Image.Image):
        return "<PIL image>", image.convert("RGB")
    if image is None:
        return _sample_image(default_backprop_sample())
    if not isinstance(image, (str, Path)):
        raise EQError(
            f"forward_and_backprop_an_image: image must be None (a built-in photo), a built-in "
            f"sample name, a path to an image file or a PIL image, got {type(image).__name__}"
        )
    path = Path(image).expanduser()
    if (path.suffix or len(path.parts) > 1) and not path.is_file():
        raise EQError(f"forward_and_backprop_an_image: image file {str(path)!r} does not exist; pass "
                      "an existing image file, a PIL image, or None for the built-in photo")
    return _sample_image(image)


def _logits(output: Any) -> torch.Tensor:
    try:
        return _output_tensor(output)
    except TypeError:
        raise EQError(
            f"forward_and_backprop_an_image: the model returned a {type(output).__name__}; expected "
            "a tensor, an output with a .logits tensor (a transformers ModelOutput) or a dict "
            "with a 'logits' tensor"
        ) from None


def forward_and_backprop_an_image(
    model: nn.Module | ZooModel,
    image: str | Path | Image.Image | None = None,
    *,
    spec: InputSpec | None = None,
    device: str | torch.device | None = None,
) -> BackpropResult:
    """Feed one image through ``model`` and backpropagate ``output.mean()``, as the tutorials do.

    ``image``: None (a built-in photo, see :func:`default_backprop_sample`), a built-in sample
    name or label, a path to an image file, or a PIL image. It is preprocessed like the
    tutorials' (resize 256, center crop 224, ImageNet normalisation; or ``spec``'s / the
    ZooModel's). The model keeps its train/eval mode; it runs on ``device`` (default: where its
    parameters are; the seeds' helper always moved it to the CPU). Works on FX- and
    torch.export-prepared modules and on outputs with ``logits`` (a ``ModelOutput``, a dict).
    """
    if isinstance(model, ZooModel):
        spec = spec or model.spec
        model = model.model
    if not isinstance(model, nn.Module):
        raise EQError(f"forward_and_backprop_an_image: model must be an nn.Module, got {type(model).__name__}")
    spec = spec or imagenet_spec()
    name, picture = _image(image)
    device = torch.device(device) if device is not None else _model_device(model)
    batch = eval_transform(spec)(picture).unsqueeze(0).to(device)
    model.to(device)
    logits = _logits(model(batch))
    if not logits.requires_grad:
        raise EQError(
            "forward_and_backprop_an_image: the model's output does not require grad, so there is "
            "nothing to backpropagate; call it outside torch.no_grad() with parameters that "
            "require grad"
        )
    loss = logits.mean()
    loss.backward()
    return BackpropResult(sample=name, logits=logits.detach().float().cpu(), loss=float(loss.detach()))
