"""Degenerate outputs: logits that make a model's fidelity baselines meaningless.

A regression baseline guards something only when the float model's logits depend on the input
and the fidelity metrics are defined. :func:`degenerate_output` names the first way they fail:

- the float logits contain NaN or inf;
- the float logits are all zero (SQNR would be ``inf`` or ``-inf`` from zero signal);
- the float logits are the same for every input (no row differs from the first by more than
  float32 resolution, ``8 * eps * max|logit|``), which needs at least two inputs to tell;
- the fake-quant logits are all zero while the float ones are not (cosine of a zero vector;
  every activation quantized away), or contain NaN or inf.

Returns None when none applies, else one sentence naming what was seen.
"""

from __future__ import annotations

import torch

from eqcore.analysis.metrics import _float64

__all__ = ["degenerate_output"]

_RESOLUTION = 8 * torch.finfo(torch.float32).eps


def _nonfinite(logits: torch.Tensor, who: str) -> str | None:
    nans, infs = int(torch.isnan(logits).sum()), int(torch.isinf(logits).sum())
    if nans or infs:
        return f"{who} logits contain {nans} NaN and {infs} inf values"
    return None


def degenerate_output(float_logits: torch.Tensor, quant_logits: torch.Tensor | None = None) -> str | None:
    """Why these logits (rows = inputs) make fidelity meaningless, or None when they do not."""
    ref = _float64(float_logits)
    rows = ref.shape[0] if ref.dim() else 1
    problem = _nonfinite(ref, "the float model's")
    if problem:
        return problem
    largest = ref.abs().max().item() if ref.numel() else 0.0
    if largest == 0.0:
        return f"the float model's logits are all zero on all {rows} inputs"
    if rows >= 2:
        spread = (ref - ref[:1]).abs().max().item()
        if spread <= _RESOLUTION * largest:
            return (
                f"the float model's logits are the same for all {rows} inputs "
                f"(largest difference {spread:.3g} at logits up to {largest:.3g})"
            )
    if quant_logits is None:
        return None
    test = _float64(quant_logits)
    problem = _nonfinite(test, "the fake-quant model's")
    if problem:
        return problem
    if test.numel() and test.abs().max().item() == 0.0:
        return "the fake-quant model's logits are all zero (every activation quantized away), so cosine similarity is undefined"
    return None
