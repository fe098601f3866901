"""Quantized tensor histograms (QTH) through forward hooks on activation quantizers.

Activation hooks sit on fake-quant modules (any ``torch.ao`` ``FakeQuantizeBase``, eqcore's
included) and histogram each module's *input* x on the module's own quantization grid, with the
qparams read at the call (after the module's observer, if on, has set them).

Entries keep the seed's attribute names: forward ``data[name]`` is a :class:`TensorHistogram`
(``hist``, ``bin_edges``), backward ``data[name]`` a :class:`GradientHistogram`
(``binned_grads``). Hooks never raise inside a forward or backward pass: NaN/inf are binned
and counted, and any other failure is stored in ``ActHistogram.errors`` under the module name.

The forward side of a sensitivity-analysis call (``_Pending``, ``_Slot``) is here too: the
forward recorder hands each call that SA pairs with a backward to the gradient hooks of
:mod:`eqcore.analysis.sa_hooks`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from eqcore._torch_ao import FakeQuantizeBase
from eqcore.analysis.binning import ValueScan, bin_tensor, scan_values
from eqcore.analysis.grid import GridBins, QuantGrid, resampled_grid
from eqcore.analysis.histograms import TensorHistogram

__all__ = [
    "ActHistogram",
    "activation_quantizers",
    "add_activation_forward_hooks",
]

logger = logging.getLogger(__name__)

ConditionsMet = Callable[[nn.Module, str], bool]
H = TypeVar("H")

_PER_CHANNEL = (
    torch.per_channel_symmetric,
    torch.per_channel_affine,
    torch.per_channel_affine_float_qparams,
)


@dataclass
class ActHistogram(Generic[H]):
    """Histograms gathered by hooks, keyed by module name, and the hooks' handles.

    ``data`` fills on the first call of each hooked module. ``reset()`` removes the hooks and
    clears everything (as in the seed); ``remove_hooks()`` keeps the data. ``errors`` names
    modules whose hook failed for a reason other than NaN/inf (the pass itself went on).
    """

    data: dict[str, H] = field(default_factory=dict)
    hook_handles: dict[str, RemovableHandle] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def remove_hooks(self) -> None:
        for handle in self.hook_handles.values():
            handle.remove()
        self.hook_handles = {}

    def reset(self) -> None:
        self.remove_hooks()
        self.data = {}
        self.errors = {}


def _record_failure(store: ActHistogram, name: str, exc: BaseException) -> None:
    if name not in store.errors:
        logger.warning("histogram hook on %s failed: %s: %s", name, type(exc).__name__, exc)
    store.errors[name] = f"{type(exc).__name__}: {exc}"


def _weight_quantizer_ids(model: nn.Module) -> set[int]:
    return {
        id(module.weight_fake_quant)
        for module in model.modules()
        if isinstance(getattr(module, "weight_fake_quant", None), nn.Module)
    }


def activation_quantizers(
    model: nn.Module, conditions_met: ConditionsMet | None = None
) -> list[tuple[str, nn.Module]]:
    """Fake-quant modules that quantize activations (weight quantizers excluded), in model order.

    ``conditions_met(module, name)`` further selects among them (None: all of them).
    """
    weight_ids = _weight_quantizer_ids(model)
    selected = []
    for name, module in model.named_modules():
        if not isinstance(module, FakeQuantizeBase) or id(module) in weight_ids:
            continue
        if conditions_met is not None and not conditions_met(module, name):
            continue
        selected.append((name, module))
    return selected


def _channel_axis(quantizer: nn.Module, x: torch.Tensor) -> int | None:
    if getattr(quantizer, "qscheme", None) not in _PER_CHANNEL or quantizer.scale.numel() == 1:
        return None
    axis = int(getattr(quantizer, "ch_axis", 0))
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"ch_axis {axis} is out of range for a {x.dim()}-d tensor")
    return axis % x.dim()


def _call_grids(
    quantizer: nn.Module, x: torch.Tensor, bit_res: int | None, cached: GridBins | None
) -> tuple[QuantGrid, QuantGrid]:
    """(histogram grid, quantizer's own grid) of one call, from the module's qparams now.

    They are the same object unless ``bit_res`` resamples the histogram grid; the second one
    gives the quantizer's output for the sensitivity score.
    """
    scale, zero_point = quantizer.scale.detach(), quantizer.zero_point.detach()
    quant_min, quant_max = int(quantizer.quant_min), int(quantizer.quant_max)
    ch_axis = _channel_axis(quantizer, x)
    h_scale, h_zero, h_min, h_max = resampled_grid(scale, zero_point, quant_min, quant_max, bit_res)
    if cached is not None and (cached.quant_min, cached.quant_max) == (h_min, h_max):
        grid = cached
    else:
        grid = GridBins.for_range(h_min, h_max)
    histogram = QuantGrid.capture(h_scale, h_zero, grid, ch_axis=ch_axis)
    if (h_min, h_max) == (quant_min, quant_max):
        return histogram, histogram
    own = QuantGrid.capture(scale, zero_point, GridBins.for_range(quant_min, quant_max), ch_axis=ch_axis)
    return histogram, own


def _first_tensor(inputs: tuple[Any, ...]) -> torch.Tensor | None:
    if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].is_floating_point():
        return inputs[0]
    return None


def _needs_grad(output: Any) -> bool:
    return isinstance(output, torch.Tensor) and output.requires_grad


def _is_registered(handle: RemovableHandle | None) -> bool:
    if handle is None:
        return False
    hooks = handle.hooks_dict_ref()
    return hooks is not None and handle.id in hooks


class _Pending:
    """One SA call, from its forward to its backward.

    Holds the quantizer's input x (which the quantizer saves for its own backward anyway, so
    this costs no memory), its version, the call's grids and a scan of x. The forward counts
    of x are deferred to the backward, which computes the indices once for both; ``settle``
    counts x on its own when the histogram is read first, or the backward never comes.
    """

    __slots__ = ("x", "version", "histogram", "quantizer", "scan", "target", "counted", "__weakref__")

    def __init__(
        self,
        x: torch.Tensor,
        histogram: QuantGrid,
        quantizer: QuantGrid | None,
        target: TensorHistogram | None,
    ) -> None:
        self.x: torch.Tensor | None = x.detach()
        self.version = x._version
        self.histogram = histogram
        self.quantizer = quantizer
        self.scan: ValueScan | None = scan_values(x) if x.device.type == "cpu" else None
        self.target = target
        self.counted = target is None
        if target is not None:
            target.defer(self)

    def settle(self) -> None:
        if self.counted or self.x is None:
            return
        self.counted = True
        self.target.add(bin_tensor(self.x, self.histogram), self.histogram)

    def release(self) -> None:
        self.x = None


def _orphaned(pending: _Pending) -> None:
    """Finalizer of a gradient sink that never fired: its graph was dropped without backward."""
    if not pending.counted and pending.target is not None:
        pending.target.orphan(pending)


class _Slot:
    """Hands one call's binning from the forward recorder to the SA hook of the same call."""

    def __init__(self, score: bool) -> None:
        self.score = score
        self.value: _Pending | None = None
        self.handle: RemovableHandle | None = None

    def wanted(self, output: Any) -> bool:
        return _needs_grad(output) and _is_registered(self.handle)


class _ForwardRecorder:
    """Forward hook: add the quantizer's input to its :class:`TensorHistogram`.

    Calls that an SA hook pairs with a backward are counted in that backward instead.
    """

    def __init__(self, name: str, store: ActHistogram, bit_res: int | None, slot: _Slot | None) -> None:
        self.name = name
        self.store = store
        self.bit_res = bit_res
        self.slot = slot

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        try:
            x = _first_tensor(inputs)
            if x is None:
                return
            hist = self.store.data.get(self.name)
            histogram, own = _call_grids(module, x, self.bit_res, hist.grid if hist is not None else None)
            if hist is None:
                hist = self.store.data[self.name] = TensorHistogram(histogram.grid, histogram.ch_axis)
            elif hist.ch_axis != histogram.ch_axis:
                raise ValueError(f"the channel axis changed between calls ({hist.ch_axis} -> {histogram.ch_axis})")
            hist.settle(orphans_only=True)
            if self.slot is not None and self.slot.wanted(output):
                quantizer = own if self.slot.score else None
                self.slot.value = _Pending(x, histogram, quantizer, hist)
            else:
                hist.add(bin_tensor(x, histogram), histogram)
        except Exception as exc:  # a hook must never break the forward pass
            _record_failure(self.store, self.name, exc)


def add_activation_forward_hooks(
    model: nn.Module,
    conditions_met: ConditionsMet | None = None,
    bit_res: int = 8,
) -> ActHistogram[TensorHistogram]:
    """Histogram the input of every selected activation quantizer on its quantization grid.

    ``conditions_met(module, name) -> bool`` selects modules (None: every activation
    quantizer); ``bit_res`` sets the histogram grid's resolution only. Call ``reset()`` on the
    result to remove the hooks.
    """
    store: ActHistogram[TensorHistogram] = ActHistogram()
    for name, module in activation_quantizers(model, conditions_met):
        store.hook_handles[name] = module.register_forward_hook(_ForwardRecorder(name, store, bit_res, None))
    if not store.hook_handles:
        logger.warning("no activation fake-quant module matched; no histogram hooks were added")
    return store
