"""Calibration: run data through a prepared fake-quant model so the observers set the qparams.

``calibrate`` runs data through the model with the observers setting scales and zero points,
then freezes them. It works on any model with eqcore/torch.ao fake quantizers, whichever
backend prepared it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from eqcore.errors import EQError
from eqcore.quant.toggles import (
    disable_param_learning,
    disable_PTQ_observer,
    enable_fake_quant,
    enable_PTQ_observer,
)


def calibrate(
    model: nn.Module,
    loader: Iterable,
    *,
    batches: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Run data through ``model`` with the observers setting the qparams, then freeze them.

    Batches may be tensors or (inputs, labels) pairs. Returns the number of samples seen. The
    model is left in eval mode with fake quantization on, the observers off and qparam learning
    off (the qparams do not require grad, so a later SA pass does not compute their gradients).
    """
    model.eval()
    model.apply(enable_fake_quant)
    model.apply(disable_param_learning)
    model.apply(enable_PTQ_observer)
    seen = 0
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if batches is not None and index >= batches:
                break
            inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
            if device is not None:
                inputs = inputs.to(device)
            model(inputs)
            seen += inputs.shape[0]
    if seen == 0:
        raise EQError("calibrate() got no data: the loader is empty")
    model.apply(disable_PTQ_observer)
    return seen
