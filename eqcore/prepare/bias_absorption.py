"""High-bias absorption (DFQ, Nagel et al. 2019): shrink large positive biases before ReLUs.

Works on the CLE groups of `eqcore.prepare.cle_pairs` and on the output statistics that
`eqcore.prepare.fusion.float_convbn_to_conv` keeps from the folded BatchNorms; kept apart from
equalization, whose layer view (`_Layer`) and group checks it reuses.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from eqcore.prepare.cle import _Layer, _resolve_groups
from eqcore.prepare.fusion import PREACT_MEAN, PREACT_STD

__all__ = [
    "absorb_high_bias",
]


@dataclass(frozen=True)
class AbsorbedBias:
    """What :func:`absorb_high_bias` moved from ``first``'s bias into ``second``'s, per channel."""

    first: str
    second: str
    absorbed: torch.Tensor

    @property
    def channels(self) -> int:
        """How many channels gave up part of their bias."""
        return int((self.absorbed > 0).sum())


def _input_weight_sums(layer: _Layer) -> torch.Tensor:
    """(out, in) matrix M with layer(x + c) = layer(x) + M @ c for a per-channel constant c."""
    w = layer._weight()
    if layer.depthwise:
        return torch.diag(w.reshape(w.shape[0], -1).sum(1))
    return w.reshape(w.shape[0], w.shape[1], -1).sum(2)


def absorb_high_bias(
    model: nn.Module,
    pairs: Sequence[Sequence[str]],
    n_std: float = 3.0,
    inplace: bool = False,
) -> tuple[nn.Module, list[AbsorbedBias]]:
    """High-bias absorption (DFQ, Nagel et al. 2019): shrink large positive biases before ReLUs.

    For each ``[first, second]`` pair (triplets give two pairs) whose ``first`` layer kept its
    folded BatchNorm's output statistics (:func:`eqcore.prepare.fusion.float_convbn_to_conv` records
    them, :func:`equalize` rescales them), ``c_i = max(0, beta_i - n_std * gamma_i)`` is taken
    out of ``first``'s bias and its effect ``sum_k W2[:, i, k] * c_i`` added to ``second``'s (a
    bias is created if it had none). Between the two layers only positively homogeneous ops
    are allowed (what :func:`find_cle_pairs` pairs), so wherever ``first``'s output stays
    above ``c`` (all but about 0.1% of a Gaussian output at 3 std) the model's output is
    unchanged, exactly for Linear and unpadded convolutions; on a zero-padded convolution the
    border outputs also move by the taps that fall on the padding. The smaller activation
    range is what quantization gains. Pairs whose first layer has no statistics are skipped.

    Returns the model (a deep copy unless ``inplace``) and one :class:`AbsorbedBias` per pair
    that was treated.
    """
    if not (isinstance(n_std, (int, float)) and math.isfinite(n_std) and n_std >= 0):
        raise ValueError(f"n_std must be a finite number >= 0, got {n_std!r}")
    model = model if inplace else copy.deepcopy(model)
    report: list[AbsorbedBias] = []
    for group in _resolve_groups(model, pairs):
        for first, second in zip(group, group[1:]):
            mean = getattr(first.module, PREACT_MEAN, None)
            std = getattr(first.module, PREACT_STD, None)
            if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor) or first.module.bias is None:
                continue
            c = (mean.double() - n_std * std.double()).clamp_min(0.0)
            shift = _input_weight_sums(second) @ c
            with torch.no_grad():
                first.module.bias.copy_(first.module.bias.detach().double() - c)
                mean.copy_(mean.double() - c)
                if second.module.bias is None:
                    second.module.bias = nn.Parameter(
                        shift.to(second.module.weight.dtype), requires_grad=second.module.weight.requires_grad
                    )
                else:
                    second.module.bias.copy_(second.module.bias.detach().double() + shift)
            report.append(AbsorbedBias(first.name, second.name, c.float()))
    return model, report
