"""Seeded models whose outputs carry signal: re-initialised zero heads and BatchNorm statistics.

A seeded (untrained) model is only a useful regression target when its logits vary with the
input. Two things in torchvision's own initialisation break that, and any model family built
with ``weights="none"`` can apply the same two rules (a third is for families that ask for it):

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

- **Under-scaled linear layers** (:func:`seed_variance_preserving`, asked for by a family):
  transformers initialises every linear layer with a fixed std (``initializer_range``, 0.02),
  which at small widths shrinks each projection's output: at hidden size 128 a layer keeps 0.23
  of its input's scale, so an attention branch (value, then output projection) adds about 0.05
  of the residual and a token barely sees the others. hf:bert-tiny's [CLS] logits then varied
  by 4e-4 across sentences at 0.03. These layers get ``N(0, 1/fan_in)`` (each keeps its input's
  scale), from a generator seeded with ``seed`` and the layer's name; biases are kept.

:func:`seed_informative` applies them, heads first. Everything is deterministic for a given
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
    "seed_variance_preserving",
]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class SeededChanges:
    """What :func:`seed_informative` changed: re-initialised layers and BatchNorms given statistics."""

    heads: tuple[str, ...]
    batchnorms: tuple[str, ...]
    rescaled: tuple[str, ...] = ()


def _generator(seed: int, name: str) -> torch.Generator:
    """A generator for one layer: the same for a seed and name, whatever the global RNG or other layers."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


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
        values = torch.rand(weight.shape, generator=_generator(seed, name), dtype=torch.float64) * (2 * bound) - bound
        with torch.no_grad():
            weight.copy_(values.to(weight.dtype))
        changed.append(name)
    return changed


def seed_variance_preserving(model: nn.Module, seed: int) -> list[str]:
    """Re-initialise every linear layer's weight to ``N(0, 1/fan_in)``; return their names.

    Each layer then keeps its input's scale, so residual branches are as large as the stream they
    add to. Drawn in float64 from a generator seeded by ``seed`` and the layer's name; biases and
    every other parameter are left as they are.
    """
    changed = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        fan_in = weight.shape[1]
        if fan_in == 0:
            continue
        values = torch.randn(weight.shape, generator=_generator(seed, name), dtype=torch.float64) / math.sqrt(fan_in)
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


def seed_informative(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], *, seed: int, variance_preserving: bool = False
) -> SeededChanges:
    """This module's rules on a seeded model: with ``variance_preserving``, every linear layer at
    ``N(0, 1/fan_in)`` first; then zero heads, then BatchNorm statistics."""
    rescaled = seed_variance_preserving(model, seed) if variance_preserving else []
    heads = seed_degenerate_heads(model, seed)
    batchnorms = seed_batchnorm_statistics(model, example_inputs)
    return SeededChanges(heads=tuple(heads), batchnorms=tuple(batchnorms), rescaled=tuple(rescaled))
