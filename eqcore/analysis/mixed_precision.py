"""A measured mixed-precision suggestion: which layers to keep at the higher-precision recipe.

:func:`suggest_mixed_precision` prepares and calibrates the model at both recipes, ranks the
layers by their isolated sensitivity at the low recipe, and keeps the fewest most sensitive
ones at the high recipe that meet the target. The search bisects over how many layers (it
assumes one more layer at the high recipe does not make the model worse) and swaps the high
model's calibrated quantizers into the low model instead of recalibrating; the answer is then
*measured*: the suggested :class:`~eqcore.quant.mixed_recipe.MixedRecipe` is prepared and
calibrated from scratch, and if that model misses the target the next layer is added.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from eqcore.analysis.evaluate import _batch_parts, collect_logits
from eqcore.analysis.layers import find_quantized_layers
from eqcore.analysis.metrics import Fidelity, fidelity
from eqcore.analysis.replay import QuantizerFlags, set_fake_quant
from eqcore.analysis.sa_run import _model_device
from eqcore.analysis.sensitivity import SensitivityReport, per_layer_sensitivity
from eqcore.errors import EQError
from eqcore.prepare.calibrate import calibrate
from eqcore.prepare.quantize import PreparedModel, fake_quant_modules, prepare
from eqcore.quant.mixed_recipe import MixedRecipe, mixed_recipe
from eqcore.quant.recipes import Recipe, get_recipe

__all__ = ["MixedPrecisionStep", "MixedPrecisionSuggestion", "MixedPrecisionTarget", "suggest_mixed_precision"]


@dataclass(frozen=True)
class MixedPrecisionTarget:
    """When a mixed model is good enough (every given condition must hold).

    ``sqnr_within_db``: its logits' SQNR is at most this many dB below the all-high model's;
    ``min_top1_agreement``: its top-1 agrees with the float model's on at least this share.
    """

    sqnr_within_db: float | None = 1.0
    min_top1_agreement: float | None = None

    def __post_init__(self) -> None:
        if self.sqnr_within_db is None and self.min_top1_agreement is None:
            raise EQError("MixedPrecisionTarget needs sqnr_within_db or min_top1_agreement")
        if self.sqnr_within_db is not None and not self.sqnr_within_db >= 0:
            raise EQError(f"sqnr_within_db must be >= 0 dB, got {self.sqnr_within_db}")
        if self.min_top1_agreement is not None and not 0 <= self.min_top1_agreement <= 1:
            raise EQError(f"min_top1_agreement must be in [0, 1], got {self.min_top1_agreement}")

    def met(self, measured: Fidelity, all_high: Fidelity) -> bool:
        ok = True
        if self.sqnr_within_db is not None:
            ok &= measured.sqnr_db >= all_high.sqnr_db - self.sqnr_within_db
        if self.min_top1_agreement is not None:
            ok &= measured.top1_agreement >= self.min_top1_agreement
        return bool(ok)

    def describe(self, high: str) -> str:
        parts = []
        if self.sqnr_within_db is not None:
            parts.append(f"SQNR within {self.sqnr_within_db:g} dB of all-{high}")
        if self.min_top1_agreement is not None:
            parts.append(f"top-1 agreement >= {self.min_top1_agreement:g}")
        return " and ".join(parts)


@dataclass(frozen=True)
class MixedPrecisionStep:
    """One tried layer set: the ``count`` most sensitive layers at the high recipe.

    ``measured`` is True for a model prepared and calibrated from the mixed recipe, False for
    the search's estimate (the high model's calibrated quantizers swapped into the low model).
    """

    count: int
    sqnr_db: float
    top1_agreement: float
    measured: bool


@dataclass(frozen=True)
class MixedPrecisionSuggestion:
    """The suggested recipe, its layer set and what it measured, next to both plain recipes.

    ``fidelity`` is measured on ``recipe`` prepared and calibrated from scratch, against the
    float model on the evaluation data; ``met`` says whether it meets ``target``. ``order`` is
    every layer by isolated sensitivity at the low recipe, most sensitive first.
    """

    recipe: MixedRecipe
    high_layers: tuple[str, ...]
    fidelity: Fidelity
    met: bool
    all_low: Fidelity
    all_high: Fidelity
    target: MixedPrecisionTarget
    order: tuple[str, ...]
    steps: tuple[MixedPrecisionStep, ...]


class _Context:
    """The model, data and settings every candidate is built and measured with."""

    def __init__(self, model: nn.Module, loader: Iterable[Any], calib_loader: Iterable[Any], *,
                 example_inputs: tuple[torch.Tensor, ...], batches: int | None, calib_batches: int | None,
                 device: torch.device, prepare_kwargs: dict[str, Any]) -> None:
        self.model, self.loader, self.calib_loader = model, loader, calib_loader
        self.example_inputs, self.batches, self.calib_batches = example_inputs, batches, calib_batches
        self.device, self.prepare_kwargs = device, prepare_kwargs
        self.reference: torch.Tensor | None = None

    def build(self, recipe: Recipe) -> PreparedModel:
        prepared = prepare(self.model, recipe, self.example_inputs, **self.prepare_kwargs)
        prepared.model.to(self.device)
        calibrate(prepared.model, self.calib_loader, batches=self.calib_batches, device=self.device)
        return prepared

    def _logits(self, model: nn.Module, enabled: Iterable[str]) -> torch.Tensor:
        flags = QuantizerFlags.capture(model)
        try:
            flags.freeze()
            set_fake_quant(fake_quant_modules(model), set(enabled))
            data = self.loader if self.batches is None else itertools.islice(self.loader, self.batches)
            return collect_logits(model, data, self.device).logits
        finally:
            flags.restore()

    def measure(self, model: nn.Module) -> Fidelity:
        """Every quantizer on, against the float model (the same model, every quantizer off)."""
        if self.reference is None:
            self.reference = self._logits(model, ())
        return fidelity(self.reference, self._logits(model, fake_quant_modules(model)))


class _Swapper:
    """Sets the low model's quantizers of each layer to the low or the high model's, role for role.

    A layer's input quantizers go with it: a per-layer recipe (torch.ao's per-module qconfig)
    sets them too.
    """

    def __init__(self, low: nn.Module, high: nn.Module, order: tuple[str, ...]) -> None:
        mine = {layer.name: layer for layer in find_quantized_layers(low)}
        theirs = {layer.name: layer for layer in find_quantized_layers(high)}
        missing = [name for name in order if name not in mine or name not in theirs]
        if missing:
            raise EQError(f"suggest_mixed_precision: layers {missing} of the report are not layers of the prepared models")
        self.model, self.order = low, order
        self.modules: dict[str, list[tuple[str, nn.Module, nn.Module]]] = {}
        for name in order:
            a, b = mine[name], theirs[name]
            pairs = [(a.weight_quantizer, b.weight_quantizer), (a.output_quantizer, b.output_quantizer)]
            if len(a.input_quantizers) == len(b.input_quantizers):
                pairs += list(zip(a.input_quantizers, b.input_quantizers))
            self.modules[name] = [
                (own, low.get_submodule(own), high.get_submodule(other))
                for own, other in pairs
                if own is not None and other is not None
            ]

    def use(self, count: int) -> nn.Module:
        """The low model with the ``count`` first layers of ``order`` at the high recipe."""
        for index, name in enumerate(self.order):
            for own, low_module, high_module in self.modules[name]:
                self.model.set_submodule(own, high_module if index < count else low_module)
        return self.model


def suggest_mixed_precision(
    model: nn.Module,
    low_recipe: str | Recipe,
    high_recipe: str | Recipe,
    loader: Iterable[Any],
    *,
    target: MixedPrecisionTarget | None = None,
    calib_loader: Iterable[Any] | None = None,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    batches: int | None = None,
    calib_batches: int | None = None,
    device: torch.device | str | None = None,
    report: SensitivityReport | None = None,
    **prepare_kwargs: Any,
) -> MixedPrecisionSuggestion:
    """Keep the fewest most-sensitive layers of float ``model`` at ``high_recipe`` that meet ``target``.

    ``loader`` (its first ``batches``) measures; ``calib_loader`` (default: ``loader``)
    calibrates every prepared model; ``prepare_kwargs`` (``cle=``, ``fuse_bn=``) go to
    ``prepare``. ``report``: a sensitivity report of the model at ``low_recipe`` to rank the
    layers with (default: an isolated sweep is run). The default target is an SQNR within
    1 dB of the all-high model's. When even every layer at the high recipe misses the
    target, the suggestion has every layer and ``met`` False. No layer at the high recipe is
    the all-low model, every layer the all-high one (the same qconfigs), measured as such.
    """
    low, high = get_recipe(low_recipe), get_recipe(high_recipe)
    target = target or MixedPrecisionTarget()
    device = torch.device(device) if device is not None else _model_device(model)
    if example_inputs is None:
        first = next(iter(loader), None)
        if first is None:
            raise EQError("suggest_mixed_precision: the loader gave no batches")
        example_inputs = (_batch_parts(first)[0].to(device),)
    context = _Context(model, loader, calib_loader if calib_loader is not None else loader,
                       example_inputs=example_inputs, batches=batches, calib_batches=calib_batches,
                       device=device, prepare_kwargs=prepare_kwargs)
    low_model, high_model = context.build(low), context.build(high)
    all_low, all_high = context.measure(low_model.model), context.measure(high_model.model)
    if report is None:
        report = per_layer_sensitivity(low_model, loader, batches=batches, device=device, leave_one_out=False)
    order = tuple(row.name for row in report.most_sensitive(len(report.layers)))
    swapper = _Swapper(low_model.model, high_model.model, order)
    steps: list[MixedPrecisionStep] = []

    def estimate_met(count: int) -> bool:
        estimate = context.measure(swapper.use(count))
        steps.append(MixedPrecisionStep(count, estimate.sqnr_db, estimate.top1_agreement, measured=False))
        return target.met(estimate, all_high)

    count = 0
    if not target.met(all_low, all_high):
        lower, count = 0, len(order)
        if estimate_met(count):
            while count - lower > 1:
                middle = (lower + count) // 2
                lower, count = (lower, middle) if estimate_met(middle) else (middle, count)
    while True:
        recipe = mixed_recipe(low, high, order[:count])
        if count == 0 or count == len(order):  # the same qconfigs as the all-low / all-high model
            measured = all_low if count == 0 else all_high
        else:
            measured = context.measure(context.build(recipe).model)
        steps.append(MixedPrecisionStep(count, measured.sqnr_db, measured.top1_agreement, measured=True))
        met = target.met(measured, all_high)
        if met or count >= len(order):
            break
        count += 1
    return MixedPrecisionSuggestion(
        recipe=recipe,
        high_layers=order[:count],
        fidelity=measured,
        met=met,
        all_low=all_low,
        all_high=all_high,
        target=target,
        order=order,
        steps=tuple(steps),
    )

