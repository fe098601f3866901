"""Accuracy and fidelity metrics on logits and tensors.

Fidelity metrics compare a reference (float) output with a test (fake-quant) output and are
computed in float64 so that the metric itself adds no rounding noise to the regression baselines.
Label ``-1`` means "unlabeled" everywhere and is skipped by accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Fidelity",
    "cosine_similarity",
    "fidelity",
    "kl_divergence",
    "sqnr",
    "top1_agreement",
    "topk_accuracy",
]

def _float64(values: Any) -> torch.Tensor:
    return torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64)


def _same_shape(reference: torch.Tensor, test: torch.Tensor, what: str) -> None:
    if reference.shape != test.shape:
        raise ValueError(f"{what}: reference shape {tuple(reference.shape)} != test shape {tuple(test.shape)}")


def _logits_2d(logits: Any, what: str) -> torch.Tensor:
    tensor = _float64(logits)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise ValueError(f"{what}: logits must be (batch, classes) or (classes,), got shape {tuple(tensor.shape)}")
    return tensor


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Share of labeled rows whose label is among the k largest logits; rows labeled -1 are skipped.

    Returns NaN when no row is labeled (accuracy is undefined there, not zero); callers that need a
    number should check for labels first (``Loaders.has_labels``).
    """
    scores = _logits_2d(logits, "topk_accuracy")
    targets = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
    if targets.numel() != scores.shape[0]:
        raise ValueError(f"topk_accuracy: {scores.shape[0]} logit rows but {targets.numel()} labels")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"topk_accuracy: k must be in [1, {scores.shape[1]}] (number of classes), got {k}")
    if (targets >= scores.shape[1]).any() or (targets < -1).any():
        raise ValueError(f"topk_accuracy: labels must be -1 (unlabeled) or in [0, {scores.shape[1]})")
    labeled = targets >= 0
    if not labeled.any():
        return math.nan
    top = scores[labeled].topk(k, dim=1).indices
    hits = (top == targets[labeled].unsqueeze(1)).any(dim=1)
    return hits.double().mean().item()


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - test)^2), in float64.

    +inf when test equals reference (no noise, including both all-zero); -inf when the reference is
    all zero but the test is not.
    """
    ref, tst = _float64(reference), _float64(test)
    _same_shape(ref, tst, "sqnr")
    noise = (ref - tst).square().sum().item()
    signal = ref.square().sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine_similarity(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Cosine of the angle between the flattened tensors, in float64.

    Defined as 1.0 when both are all zero and 0.0 when exactly one is, so it is never NaN.
    """
    ref, tst = _float64(reference).reshape(-1), _float64(test).reshape(-1)
    _same_shape(ref, tst, "cosine_similarity")
    ref_norm, tst_norm = ref.norm().item(), tst.norm().item()
    if ref_norm == 0.0 or tst_norm == 0.0:
        return 1.0 if ref_norm == tst_norm else 0.0
    return (torch.dot(ref, tst).item() / ref_norm) / tst_norm


def top1_agreement(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Share of rows where both models predict the same class (argmax; first index on ties)."""
    ref, tst = _logits_2d(ref_logits, "top1_agreement"), _logits_2d(test_logits, "top1_agreement")
    _same_shape(ref, tst, "top1_agreement")
    if ref.shape[0] == 0:
        return math.nan
    return (ref.argmax(dim=1) == tst.argmax(dim=1)).double().mean().item()


def kl_divergence(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(test)) in nats, via float64 log-softmax."""
    ref, tst = _logits_2d(ref_logits, "kl_divergence"), _logits_2d(test_logits, "kl_divergence")
    _same_shape(ref, tst, "kl_divergence")
    if ref.shape[0] == 0:
        return math.nan
    log_p, log_q = ref.log_softmax(dim=1), tst.log_softmax(dim=1)
    p = log_p.exp()
    per_row = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=1)
    return per_row.clamp_min(0.0).mean().item()


@dataclass(frozen=True)
class Fidelity:
    """How closely test logits follow reference logits (all float64-computed)."""

    sqnr_db: float
    cosine_similarity: float
    top1_agreement: float
    kl_divergence: float


def fidelity(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> Fidelity:
    """All logit fidelity metrics at once."""
    return Fidelity(
        sqnr_db=sqnr(ref_logits, test_logits),
        cosine_similarity=cosine_similarity(ref_logits, test_logits),
        top1_agreement=top1_agreement(ref_logits, test_logits),
        kl_divergence=kl_divergence(ref_logits, test_logits),
    )
