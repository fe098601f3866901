"""Import torchao's PT2E quantization API once, quietly.

torchao registers enums with torch's pytree on import and torch logs a warning for each; our
users cannot act on it, so the import runs with that logger raised to ERROR. Only the PT2E
backend imports this module, so ``import eqcore`` does not pay for torchao.
"""

from __future__ import annotations

import logging
import warnings

_pytree_logger = logging.getLogger("torch.utils._pytree")
_level = _pytree_logger.level
_pytree_logger.setLevel(logging.ERROR)
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        from torchao.quantization.pt2e import FakeQuantizeBase as TorchaoFakeQuantizeBase
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer import (
            QuantizationAnnotation,
            QuantizationSpec,
            Quantizer,
        )
finally:
    _pytree_logger.setLevel(_level)

__all__ = [
    "QuantizationAnnotation",
    "QuantizationSpec",
    "Quantizer",
    "TorchaoFakeQuantizeBase",
    "prepare_qat_pt2e",
]
