"""Module-apply toggles for fake quantization and PTQ observation.

Use with ``model.apply(enable_fake_quant)`` and friends. They work on eqcore's modules and on any
torch.ao fake-quant module (``FakeQuantize``, ``_LearnableFakeQuantize``, ...); other modules are
left alone, so they are safe to apply to a whole model.
"""

from __future__ import annotations

import torch
from torch import nn

from eqcore._torch_ao import FakeQuantizeBase


def _is_learnable(module: nn.Module) -> bool:
    return hasattr(module, "toggle_observer_update") and hasattr(module, "toggle_qparam_learning")


def observer_is_on(quantizer: nn.Module) -> bool:
    """Whether the quantizer's observer updates its qparams: ``static_enabled`` on learnable
    quantizers (torch's and ours), ``observer_enabled`` on the others."""
    flag = getattr(quantizer, "static_enabled", None)
    if not isinstance(flag, torch.Tensor):
        flag = quantizer.observer_enabled
    return bool(flag[0])


def enable_fake_quant(module: nn.Module) -> None:
    """Fake-quantize the module's output."""
    if isinstance(module, FakeQuantizeBase):
        module.enable_fake_quant()


def disable_fake_quant(module: nn.Module) -> None:
    """Pass the input through unquantized (the observer keeps its own state)."""
    if isinstance(module, FakeQuantizeBase):
        module.disable_fake_quant()


def enable_PTQ_observer(module: nn.Module) -> None:  # noqa: N802 - the seeds' name
    """Let the observer set scale and zero point from the data (PTQ calibration).

    Only the observer is switched, as in the seeds: learnable qparams keep their ``requires_grad``
    (so a backward still gives every parameter a ``.grad``; the observer overwrites the values
    on the next forward). :func:`eqcore.prepare.calibrate.calibrate` also stops their learning.
    """
    if _is_learnable(module):
        module.toggle_observer_update(enabled=True)
    elif isinstance(module, FakeQuantizeBase):
        module.enable_observer()


def disable_PTQ_observer(module: nn.Module) -> None:  # noqa: N802 - the seeds' name
    """Freeze the qparams: the observer stops updating them."""
    if _is_learnable(module):
        module.toggle_observer_update(enabled=False)
    elif isinstance(module, FakeQuantizeBase):
        module.disable_observer()


def enable_param_learning(module: nn.Module) -> None:
    """On learnable quantizers: learn scale and zero point by backprop (QAT), observer off."""
    if _is_learnable(module):
        module.enable_param_learning()


def disable_param_learning(module: nn.Module) -> None:
    """On learnable quantizers: stop learning scale and zero point (they stop requiring grad)."""
    if _is_learnable(module):
        module.toggle_qparam_learning(enabled=False)
