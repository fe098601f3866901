"""Seeded models whose outputs carry signal: re-initialised zero heads and BatchNorm statistics.

A seeded (untrained) model is only a useful regression target when its logits vary with the
input. Two things in torchvision's own initialisation break that, and any model family built
with ``weights="none"`` can apply the same two rules:

- **Zero layers** (:func:`seed_degenerate_heads`): a conv or linear layer whose weight is all zero
  (vit_b_16's ``heads.head``) outputs its bias whatever the input. Each such layer gets torch's
  default init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, from a generator seeded with ``seed`` and
  the layer's name (so the result does not depend on the global RNG or on other layers); its bias
  is kept. Normalisation weights set to zero on purpose (zero-init residual branches) are 1-D and
  left alone: the skip connection carries the signal there.
- **BatchNorm statistics** (:func:`seed_batchnorm_statistics`): a fresh BatchNorm holds running
  mean 0 and variance 1, so in eval mode it normalises nothing and activations shrink or grow
  geometrically with depth (logits of 1e-14 for efficientnet_b0, 1e8 for resnet152, constant for
  googlenet and shufflenet). The running statistics are set from one train-mode forward of
  seeded noise inputs (only BatchNorm in train mode, nothing else changes), as training would
  have set them from data. Affine weights and biases stay as initialised.

:func:`seed_informative` applies both, heads first. Everything is deterministic for a given
seed and example input.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "SeededChanges",
    "seed_batchnorm_statistics",
    "seed_degenerate_heads",
    "seed_informative",
]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class SeededChanges:
    """What :func:`seed_informative` changed: re-initialised layers and BatchNorms given statistics."""

    heads: tuple[str, ...]
    batchnorms: tuple[str, ...]


def seed_degenerate_heads(model: nn.Module, seed: int) -> list[str]:
    """Re-initialise every conv/linear layer whose weight is all zero; return their names.

    The new weight is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (torch's default for these layers)
    drawn from a generator seeded by ``seed`` and the layer's name; the bias is left as it is.
    """
    changed = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, _WEIGHTED) or not isinstance(weight, torch.Tensor) or weight.any():
            continue
        fan_in = weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        values = torch.rand(weight.shape, generator=generator, dtype=torch.float64) * (2 * bound) - bound
        with torch.no_grad():
            weight.copy_(values.to(weight.dtype))
        changed.append(name)
    return changed


def seed_batchnorm_statistics(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> list[str]:
    """Set every BatchNorm's running mean and variance from one forward of ``example_inputs``.

    Only the BatchNorm modules run in train mode (Dropout and stochastic depth stay in eval), with
    a cumulative average over that one batch; all modules' training flags are restored. Returns
    the names of the BatchNorms that were set (none for a model without BatchNorm).
    """
    batchnorms = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not batchnorms:
        return []
    flags = [(module, module.training) for module in model.modules()]
    momenta = [(module, module.momentum) for _, module in batchnorms]
    try:
        model.eval()
        for _, module in batchnorms:
            module.reset_running_stats()
            module.momentum = None  # cumulative average: the statistics of exactly this batch
            module.train()
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for module, momentum in momenta:
            module.momentum = momentum
        for module, training in flags:
            module.training = training
    return [name for name, _ in batchnorms]


def seed_informative(model: nn.Module, example_inputs: Sequence[torch.Tensor], *, seed: int) -> SeededChanges:
    """Both rules of this module on a seeded model: zero heads first, then BatchNorm statistics."""
    heads = seed_degenerate_heads(model, seed)
    batchnorms = seed_batchnorm_statistics(model, example_inputs)
    return SeededChanges(heads=tuple(heads), batchnorms=tuple(batchnorms))
