"""The work behind a generated suite: model -> prepare -> calibrate -> evaluate -> SA.

``plan()`` is cheap (build and prepare the model) and tells collection which checks exist;
``ModelRun.execute()`` does the expensive part once per session (and once per xdist worker).
Data flows one way; nothing here knows about baselines or reports.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from eqcore.models.loaders import Loaders, without_labels
from eqcore.errors import EQError
from eqcore.analysis.hooks import activation_quantizers
from eqcore.analysis.sa_run import SAResult, run_sensitivity_analysis
from eqcore.analysis.degenerate import degenerate_output
from eqcore.analysis.evaluate import DatasetEvaluation, collect_logits, evaluate_dataset, per_layer_sqnr
from eqcore.analysis.metrics import Fidelity, fidelity
from eqcore.analysis.mixed_precision import MixedPrecisionSuggestion
from eqcore.analysis.sensitivity import SensitivityReport
from eqcore.prepare.calibrate import calibrate
from eqcore.prepare.quantize import PreparedModel, fake_quant_modules, prepare
from eqcore.quant.recipes import Recipe
from eqcore.quant.toggles import disable_PTQ_observer, enable_PTQ_observer
from eqcore.models.zoo import ZooModel

from pytest_easyquant import sensitivity
from pytest_easyquant.registry import Registry
from pytest_easyquant.sensitivity import resolve_mixed_recipes


@dataclass(frozen=True)
class RunRequest:
    """Everything that determines a model's results (and so its baselines)."""

    model: str
    weights: str
    data: str | None
    recipe: str
    cle: bool
    device: str
    seed: int
    calib_batches: int
    batch_size: int
    sa_batches: int
    mixed_precision: str | None = None
    backend: str = "auto"


@dataclass
class Plan:
    """What a request produces, known before anything runs: the names of its checks.

    ``notes`` are one-line remarks for the summary (e.g. why the data count as unlabeled here).
    """

    request: RunRequest
    zoo: ZooModel
    recipe: Recipe
    prepared: PreparedModel
    loaders: Loaders
    mixed_recipes: tuple[Recipe, Recipe] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def data_name(self) -> str:
        return self.loaders.name

    @property
    def backend(self) -> str:
        """The preparation backend that captured the model ("fx" unless the prepared model says)."""
        return str(getattr(self.prepared, "backend", None) or "fx")

    @cached_property
    def quantizers(self) -> list[str]:
        return list(fake_quant_modules(self.prepared.model))

    @cached_property
    def activation_quantizers(self) -> list[str]:
        return [name for name, _ in activation_quantizers(self.prepared.model)]

    @cached_property
    def weight_modules(self) -> list[str]:
        return [
            name
            for name, module in self.prepared.model.named_modules()
            if isinstance(getattr(module, "weight_fake_quant", None), nn.Module)
        ]


def plan(request: RunRequest, registry: Registry) -> Plan:
    """Build the model and data and insert the quantizers; EQError on bad input."""
    torch.manual_seed(request.seed)
    zoo = registry.make_model(request.model, request.weights, seed=request.seed)
    recipe = registry.recipe(request.recipe)
    loaders = registry.loaders(
        request.data or zoo.default_data,
        zoo.spec,
        batch_size=request.batch_size,
        calib_batches=request.calib_batches,
        seed=request.seed,
        model_name=request.model,
    )
    device = torch.device(request.device)
    zoo.model.to(device).eval()
    example = tuple(t.to(device) for t in zoo.example_inputs())
    notes: list[str] = []
    probe = collect_logits(zoo.model, [example[0]], device).logits
    outputs = probe.shape[1] if probe.dim() > 1 else 1
    if loaders.has_labels and loaders.max_label >= outputs:
        notes.append(
            f"data {loaders.name!r} are unlabeled for this model: {outputs} outputs, labels up to "
            f"{loaders.max_label}; fidelity is checked, accuracy is not"
        )
        loaders = without_labels(loaders)
    prepared = prepare(zoo.model, recipe, example, cle=request.cle, backend=request.backend)
    prepared.model.to(device)
    mixed = resolve_mixed_recipes(request.mixed_precision, registry)
    return Plan(
        request=request, zoo=zoo, recipe=recipe, prepared=prepared, loaders=loaders, mixed_recipes=mixed, notes=notes
    )


@dataclass
class QParams:
    scale: np.ndarray
    zero_point: np.ndarray


@dataclass
class ModelRun:
    """The results of one request, computed once and shared by all of its checks."""

    plan: Plan
    float_eval: DatasetEvaluation
    quant_eval: DatasetEvaluation
    fidelity: Fidelity
    layer_sqnr: dict[str, float]
    qparams: dict[str, QParams]
    sa: SAResult
    warnings: list[str] = field(default_factory=list)
    degenerate: str | None = None  # why the outputs make fidelity meaningless (eqcore.analysis.degenerate)

    @property
    def request(self) -> RunRequest:
        return self.plan.request

    @cached_property
    def sensitivity(self) -> SensitivityReport:
        """The per-layer sensitivity sweep, run once on first use (by the ``sensitivity`` check)."""
        return sensitivity.sweep(self)

    @cached_property
    def mixed_precision(self) -> MixedPrecisionSuggestion | None:
        """The ``--eq-mixed-precision`` suggestion, measured once on first use."""
        return sensitivity.suggest(self)

    @classmethod
    def execute(cls, plan: Plan) -> ModelRun:
        request = plan.request
        device = torch.device(request.device)
        model = plan.prepared.model
        torch.manual_seed(request.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _calibrate(model, plan.loaders.calib, device)
            float_eval = evaluate_dataset(plan.zoo.model, plan.loaders.eval, device)
            quant_eval = evaluate_dataset(model, plan.loaders.eval, device)
            first_batch = next(iter(plan.loaders.eval))[0].to(device)
            layers = per_layer_sqnr(plan.prepared.float_model, model, first_batch)
            sa = run_sensitivity_analysis(
                model, plan.loaders.eval, batches=request.sa_batches, bit_res=None, device=device
            )
        qparams = {}
        for name, quantizer in fake_quant_modules(model).items():
            scale, zero_point = quantizer.calculate_qparams()
            qparams[name] = QParams(
                scale=scale.detach().double().cpu().numpy().reshape(-1),
                zero_point=zero_point.detach().cpu().numpy().reshape(-1).astype(np.int64),
            )
        notes = sorted({f"{w.category.__name__}: {w.message}" for w in caught if _worth_reporting(w)})
        return cls(
            plan=plan,
            float_eval=float_eval,
            quant_eval=quant_eval,
            fidelity=fidelity(float_eval.logits, quant_eval.logits),
            layer_sqnr=layers,
            qparams=qparams,
            sa=sa,
            warnings=notes,
            degenerate=degenerate_output(float_eval.logits, quant_eval.logits),
        )


def _calibrate(model: nn.Module, loader: Any, device: torch.device) -> None:
    """``calibrate``, but a failure caused by NaN/inf activations names the first quantizer that saw them.

    torch.ao's HistogramObserver (the w8a8 recipes) cannot observe NaN and fails deep inside
    ``torch.histc``; the user needs to know which layer produced the values instead. Only a
    failed calibration looks for them (:func:`_first_nonfinite_input`): a check on every
    quantizer's input in every batch cost two more ops per quantizer call, about a fifth of
    calibration on vit_tiny, for nothing when calibration succeeds.
    """
    try:
        calibrate(model, loader, device=device)
    except Exception as exc:
        found = _first_nonfinite_input(model, loader, device)
        if found is None:
            raise
        name, nans, infs = found
        raise EQError(
            f"{name} produced {nans} NaN and {infs} inf values during calibration, and its observer "
            f"failed on them ({describe_error(exc)}); fix the layer that feeds {name}"
        ) from exc


class _NonFinite(Exception):
    """Stops the forward at the first quantizer whose input holds NaN or inf."""


def _first_nonfinite_input(model: nn.Module, loader: Any, device: torch.device) -> tuple[str, int, int] | None:
    """(quantizer, NaN count, inf count) of the first quantizer, in execution order, whose input
    holds NaN or inf on the calibration data; None when none does.

    Runs the batches again as calibration did, fake quantization on, but with the observers off,
    so a failing observer does not stop the search; the observers are on again afterwards, as
    the failed calibration left them.
    """

    def watch(name: str) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise _NonFinite(name, int(torch.isnan(x).sum()), int(torch.isinf(x).sum()))

        return hook

    quantizers = fake_quant_modules(model)
    handles = [m.register_forward_pre_hook(watch(name)) for name, m in quantizers.items()]
    model.apply(disable_PTQ_observer)
    try:
        with torch.no_grad():
            for batch in loader:
                inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
                model(inputs.to(device))
    except _NonFinite as found:
        name, nans, infs = found.args
        return name, nans, infs
    except Exception:
        return None  # the model fails without NaN or inf: the calibration's own error says why
    finally:
        for handle in handles:
            handle.remove()
        model.apply(enable_PTQ_observer)
    return None


def _worth_reporting(record: warnings.WarningMessage) -> bool:
    """torch.ao's own deprecation chatter is not something our users can act on."""
    text = str(record.message)
    return not (
        issubclass(record.category, (DeprecationWarning, FutureWarning))
        or "must run observer before calling calculate_qparams" in text
    )


def describe_error(exc: BaseException) -> str:
    """One line for a pipeline failure."""
    if isinstance(exc, EQError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def as_float(value: Any) -> float:
    return float(value) if value is not None else float("nan")
