"""Import torch.ao.quantization once, with its deprecation warning silenced.

torch >= 2.9 warns on import that torch.ao.quantization is deprecated; our users cannot act on
that warning, so every eqcore module imports torch.ao through here.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    import torch.ao.quantization as tq
    from torch.ao.quantization import FakeQuantizeBase, QConfig
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
    from torch.ao.quantization.observer import ObserverBase, UniformQuantizationObserverBase
    from torch.ao.quantization.qconfig_mapping import QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

__all__ = [
    "FakeQuantizeBase",
    "ObserverBase",
    "QConfig",
    "QConfigMapping",
    "UniformQuantizationObserverBase",
    "_LearnableFakeQuantize",
    "prepare_qat_fx",
    "tq",
]
