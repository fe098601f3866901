"""Import torchao's PT2E quantization API once, quietly.

torchao registers enums with torch's pytree on import and torch logs a warning for each; our
users cannot act on it, so the import runs with that logger raised to ERROR. Only the PT2E
backend imports this module, so ``import eqcore`` does not pay for torchao.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Silence torch's pytree log and deprecation warnings while importing torchao (timm and
    transformers import it too when it is installed)."""
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


with quiet_imports():
    from torchao.quantization.pt2e import FakeQuantizeBase as TorchaoFakeQuantizeBase
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        QuantizationSpec,
        Quantizer,
    )

__all__ = [
    "QuantizationAnnotation",
    "QuantizationSpec",
    "Quantizer",
    "TorchaoFakeQuantizeBase",
    "prepare_qat_pt2e",
    "quiet_imports",
]
