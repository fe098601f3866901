"""Running models on data: logits and accuracy over a loader, per-layer SQNR, and the seeds'
``evaluate`` helper that classifies one built-in photo.

Models run in eval mode without grad, and every module's training flag is restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from eqcore.analysis.metrics import _float64, _same_shape, topk_accuracy
from eqcore.errors import EQError
from eqcore.models.samples import find_sample
from eqcore.models.specs import InputSpec, eval_transform, imagenet_spec
from eqcore.models.zoo import ZooModel

__all__ = [
    "CollectedLogits",
    "DatasetEvaluation",
    "EvaluationResult",
    "Prediction",
    "collect_logits",
    "evaluate",
    "evaluate_dataset",
    "per_layer_sqnr",
]

DEFAULT_SAMPLE = "grace_hopper"


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode and restore every module's training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _output_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"model output of type {type(output).__name__} is not a logits tensor")


def _batch_parts(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 else None
        return batch[0], None if labels is None else torch.as_tensor(labels)
    raise TypeError(f"expected batches of tensors or (inputs, labels), got {type(batch).__name__}")


@dataclass(frozen=True)
class CollectedLogits:
    """Logits (float32, CPU) of a whole loader, and its labels (-1 where unlabeled)."""

    logits: torch.Tensor
    labels: torch.Tensor


def collect_logits(model: nn.Module, loader: Iterable[Any], device: str | torch.device) -> CollectedLogits:
    """Run ``model`` (moved to ``device``, in eval mode, no grad) over ``loader`` in order.

    Batches are ``(inputs, labels)`` or bare inputs (labels then -1). The model's training flags
    are restored afterwards; enabled observers still observe, as in any forward pass.
    """
    model.to(device)
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with _eval_mode(model), torch.no_grad():
        for batch in loader:
            inputs, targets = _batch_parts(batch)
            out = _output_tensor(model(inputs.to(device))).detach().float().cpu()
            logits.append(out)
            labels.append(
                torch.full((out.shape[0],), -1, dtype=torch.long) if targets is None else targets.long().cpu()
            )
    if not logits:
        raise EQError("collect_logits: the loader yielded no batches")
    return CollectedLogits(logits=torch.cat(logits), labels=torch.cat(labels))


@dataclass(frozen=True)
class DatasetEvaluation:
    """Logits and accuracy over a data set; top1/top5 are None when no sample is labeled."""

    logits: torch.Tensor
    labels: torch.Tensor
    top1: float | None
    top5: float | None
    num_samples: int
    num_labeled: int


def evaluate_dataset(model: nn.Module, loader: Iterable[Any], device: str | torch.device) -> DatasetEvaluation:
    """Collect logits over ``loader`` and compute top-1/top-5 accuracy on the labeled samples.

    top5 uses k = min(5, number of classes).
    """
    collected = collect_logits(model, loader, device)
    num_labeled = int((collected.labels >= 0).sum())
    top1 = top5 = None
    if num_labeled:
        top1 = topk_accuracy(collected.logits, collected.labels, k=1)
        top5 = topk_accuracy(collected.logits, collected.labels, k=min(5, collected.logits.shape[1]))
    return DatasetEvaluation(
        logits=collected.logits,
        labels=collected.labels,
        top1=top1,
        top5=top5,
        num_samples=collected.logits.shape[0],
        num_labeled=num_labeled,
    )


def _weighted_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if name and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() >= 2
    }


def _input_batches(inputs: torch.Tensor | Iterable[Any]) -> Iterator[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        yield inputs
        return
    for batch in inputs:
        yield _batch_parts(batch)[0]


def per_layer_sqnr(
    float_model: nn.Module,
    quant_model: nn.Module,
    inputs: torch.Tensor | Iterable[Any],
    *,
    layer_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """SQNR (dB) of each weighted layer's output, quant vs float, over the same inputs.

    Layers are modules with a >= 2-D ``weight`` (conv, linear, torch.ao QAT modules) that have the
    same qualified name in both models, e.g. a BN-fused float model and its fake-quant version.
    Where the quant module is a fused "...ReLU" module (ConvReLU2d, ConvBnReLU2d, LinearReLU) and
    the float one is not, the float output is passed through ReLU first so both compare the same
    point. Signal and noise are summed over all batches and calls before the ratio. Both models run
    in eval mode without grad; disable observers first if calibration must not change.
    ``inputs`` is a tensor, or an iterable of tensors or (inputs, labels) batches.
    """
    float_layers, quant_layers = _weighted_modules(float_model), _weighted_modules(quant_model)
    common = [name for name in float_layers if name in quant_layers]
    if layer_names is not None:
        missing = [name for name in layer_names if name not in float_layers or name not in quant_layers]
        if missing:
            raise EQError(
                f"per_layer_sqnr: layers {missing} are not weighted modules in both models; "
                f"common weighted layers are {common[:10]}{'...' if len(common) > 10 else ''}"
            )
        common = [name for name in common if name in set(layer_names)]
    apply_relu = {
        name: "ReLU" in type(quant_layers[name]).__name__ and "ReLU" not in type(float_layers[name]).__name__
        for name in common
    }
    signal = dict.fromkeys(common, 0.0)
    noise = dict.fromkeys(common, 0.0)
    pending: dict[str, list[torch.Tensor]] = {name: [] for name in common}

    def record(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            out = _float64(_output_tensor(output))
            pending[name].append(out.clamp_min(0.0) if apply_relu[name] else out)

        return hook

    def compare(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if not pending[name]:
                raise EQError(f"per_layer_sqnr: layer {name!r} ran more often in the quant model than in the float model")
            ref = pending[name].pop(0)
            test = _float64(_output_tensor(output))
            _same_shape(ref, test, f"per_layer_sqnr layer {name!r}")
            signal[name] += ref.square().sum().item()
            noise[name] += (ref - test).square().sum().item()

        return hook

    with _eval_mode(float_model), _eval_mode(quant_model), torch.no_grad():
        for batch in _input_batches(inputs):
            handles = [float_layers[name].register_forward_hook(record(name)) for name in common]
            try:
                float_model(batch)
            finally:
                for handle in handles:
                    handle.remove()
            handles = [quant_layers[name].register_forward_hook(compare(name)) for name in common]
            try:
                quant_model(batch)
            finally:
                for handle in handles:
                    handle.remove()
            unmatched = [name for name in common if pending[name]]
            if unmatched:
                raise EQError(f"per_layer_sqnr: layers {unmatched[:5]} ran more often in the float model than in the quant model")

    result: dict[str, float] = {}
    for name in common:
        if noise[name] == 0.0:
            result[name] = math.inf
        elif signal[name] == 0.0:
            result[name] = -math.inf
        else:
            result[name] = 10.0 * math.log10(signal[name] / noise[name])
    return result


@dataclass(frozen=True)
class Prediction:
    """One of the top-k classes of an evaluation."""

    label: str
    index: int
    probability: float


@dataclass(frozen=True)
class EvaluationResult:
    """Top-k softmax predictions of a model on one image, plus its raw logits (CPU, float32)."""

    sample: str
    predictions: tuple[Prediction, ...]
    logits: torch.Tensor = field(repr=False)

    @property
    def top1(self) -> Prediction:
        return self.predictions[0]


def _sample_image(sample: str | Path | None) -> tuple[str, Image.Image]:
    if sample is None:
        found = find_sample(DEFAULT_SAMPLE)
        return found.name, found.load()
    try:
        found = find_sample(str(sample))
        return found.name, found.load()
    except EQError:
        path = Path(sample).expanduser()
        if not path.is_file():
            raise
    try:
        with Image.open(path) as image:
            return str(path), image.convert("RGB")
    except OSError as exc:
        raise EQError(f"cannot read image file {str(path)!r}: {exc}") from exc


def evaluate(
    model: nn.Module | ZooModel,
    device: str | torch.device,
    sample: str | Path | None = None,
    *,
    topk: int = 5,
    spec: InputSpec | None = None,
    print_results: bool = True,
) -> EvaluationResult:
    """Classify one built-in photo and print "Evaluation:" and the top-k ``<label> <prob>`` lines.

    ``sample`` is a built-in sample name ("grace_hopper", the default; "chelsea", ...), an ImageNet
    label one of them carries ("tabby"), or an image file path; an unknown one raises EQError
    listing what is available. ``model`` may be an nn.Module (an FX fake-quant GraphModule too) or
    a ``zoo.ZooModel``; ``spec`` defaults to the ZooModel's or ImageNet's 3x224x224 spec. The model
    is moved to ``device`` (like the seeds' helper) and run once in eval mode without grad; its
    training flags are restored, and enabled observers observe the image.
    """
    if isinstance(model, ZooModel):
        spec = spec or model.spec
        model = model.model
    spec = spec or imagenet_spec()
    if spec.default_data == "digits":
        raise EQError(
            "evaluate() classifies built-in photos and cannot feed a 1x8x8 digits model; use "
            "evaluate_dataset(model, digits_loaders().test, device) instead"
        )
    name, image = _sample_image(sample)
    batch = eval_transform(spec)(image).unsqueeze(0).to(device)
    model.to(device)
    with _eval_mode(model), torch.no_grad():
        logits = _output_tensor(model(batch)).detach().float().cpu()[0]
    if not 1 <= topk <= logits.numel():
        raise ValueError(f"evaluate: topk must be in [1, {logits.numel()}], got {topk}")
    probabilities = torch.softmax(logits, dim=0)
    values, indices = probabilities.topk(topk)
    predictions = tuple(
        Prediction(
            label=spec.labels[i] if i < len(spec.labels) else str(i),
            index=i,
            probability=p,
        )
        for p, i in zip(values.tolist(), indices.tolist())
    )
    if print_results:
        print("\nEvaluation:")
        for prediction in predictions:
            print(f"{prediction.label} {prediction.probability}")
    return EvaluationResult(sample=name, predictions=predictions, logits=logits)
