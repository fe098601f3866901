"""Token-id inputs for text models: their spec and the built-in offline ``tokens`` data.

A text model here takes one tensor of token ids, ``(batch, seq_len)`` int64, padded with the
spec's ``pad_id``; the model derives its attention mask from it (``ids != pad_id``), so a batch
is a plain tensor like an image batch and every stage feeds it the same way. The ``tokens`` data
are seeded random sentences of varied lengths (so the attention masks vary too), unlabeled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, TensorDataset

from eqcore.errors import EQError
from eqcore.models.datasets import _check_batch_size, _loader

__all__ = ["TokenSpec", "token_ids", "tokens_loader"]

EVAL_SENTENCES = 32


@dataclass(frozen=True)
class TokenSpec:
    """What a text model expects: ``seq_len`` token ids below ``vocab_size``, ``pad_id`` padding.

    ``first_id`` is the id every sentence starts with (BERT's [CLS]); ids drawn for the words
    lie in ``[low_id, vocab_size)``, above the special tokens. ``labels[i]`` names output ``i``.
    """

    seq_len: int
    vocab_size: int
    labels: tuple[str, ...] = field(repr=False)
    pad_id: int = 0
    first_id: int | None = None
    low_id: int = 1
    default_data: str = "tokens"

    def __post_init__(self) -> None:
        if self.seq_len < 2 or not 0 <= self.low_id < self.vocab_size:
            raise EQError(
                f"TokenSpec needs seq_len >= 2 and 0 <= low_id < vocab_size, got seq_len={self.seq_len}, "
                f"low_id={self.low_id}, vocab_size={self.vocab_size}"
            )

    @property
    def shape(self) -> tuple[int]:
        return (self.seq_len,)

    @property
    def channels(self) -> int:
        return 0

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def example_inputs(self, batch_size: int = 1, *, seed: int = 0) -> tuple[torch.Tensor]:
        """Seeded token ids of full length, e.g. to capture the model."""
        return (token_ids(self, batch_size, seed=seed, min_len=self.seq_len),)


def token_ids(spec: TokenSpec, count: int, *, seed: int, min_len: int | None = None) -> torch.Tensor:
    """``count`` seeded sentences of ids, lengths uniform in [min_len, seq_len], padded."""
    generator = torch.Generator().manual_seed(seed)
    low = max(2, spec.seq_len // 4) if min_len is None else min_len
    lengths = torch.randint(low, spec.seq_len + 1, (count,), generator=generator)
    ids = torch.randint(spec.low_id, spec.vocab_size, (count, spec.seq_len), generator=generator)
    if spec.first_id is not None:
        ids[:, 0] = spec.first_id
    positions = torch.arange(spec.seq_len).expand(count, -1)
    return ids.masked_fill(positions >= lengths[:, None], spec.pad_id)


def tokens_loader(
    spec: TokenSpec, *, split: str = "eval", batch_size: int = 8, count: int = 32, seed: int = 0
) -> DataLoader:
    """The built-in ``tokens`` data: ``count`` calibration sentences or the fixed evaluation set.

    Calibration and evaluation sentences come from different seeds; labels are -1 (unlabeled).
    """
    _check_batch_size(batch_size)
    if split not in ("eval", "calib"):
        raise EQError(f"split must be 'eval' or 'calib', got {split!r}")
    if split == "eval":
        ids = token_ids(spec, EVAL_SENTENCES, seed=10_000)
    else:
        ids = token_ids(spec, count, seed=seed)
    return _loader(TensorDataset(ids, torch.full((ids.shape[0],), -1, dtype=torch.long)), batch_size)
