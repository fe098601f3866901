"""eqcore's fake quantizers as torchao PT2E fake quantizers.

torchao's ``prepare_qat_pt2e`` only inserts modules that are torchao ``FakeQuantizeBase``
instances and builds them from a ``QuantizationSpec`` (``dtype``, ``quant_min``, ``quant_max``,
``qscheme``, ``is_dynamic`` and, for per-channel classes, ``ch_axis``). These classes are the
same modules as ``EQLearnableFakeQuantize`` / ``EQFakeQuantize`` (same kernels, so the same bits
on the same tensor and qparams, and still torch.ao ``FakeQuantizeBase`` instances for every
downstream stage), registered as torchao fake quantizers too.
"""

from __future__ import annotations

from typing import Any

from eqcore._torchao import TorchaoFakeQuantizeBase
from eqcore.quant.modules import EQFakeQuantize, EQLearnableFakeQuantize

__all__ = ["PT2ELearnableFakeQuantize", "PT2EFakeQuantize", "pt2e_variant"]


class PT2ELearnableFakeQuantize(EQLearnableFakeQuantize, TorchaoFakeQuantizeBase):
    """``EQLearnableFakeQuantize`` that torchao's PT2E prepare accepts."""

    def __init__(self, *args: Any, is_dynamic: bool = False, **kwargs: Any) -> None:
        if is_dynamic:
            raise ValueError("eqcore's fake quantizers are static: is_dynamic must be False")
        super().__init__(*args, **kwargs)


class PT2EFakeQuantize(EQFakeQuantize, TorchaoFakeQuantizeBase):
    """``EQFakeQuantize`` that torchao's PT2E prepare accepts."""

    def __init__(self, *args: Any, is_dynamic: bool = False, **kwargs: Any) -> None:
        if is_dynamic:
            raise ValueError("eqcore's fake quantizers are static: is_dynamic must be False")
        super().__init__(*args, **kwargs)


def _torchao_with_args(cls: type, **kwargs: Any) -> Any:
    # torchao's prepare reads the class from torchao's own PartialWrapper, not torch.ao's.
    return TorchaoFakeQuantizeBase.with_args.__func__(cls, **kwargs)


PT2ELearnableFakeQuantize.with_args = classmethod(_torchao_with_args)  # type: ignore[assignment]
PT2EFakeQuantize.with_args = classmethod(_torchao_with_args)  # type: ignore[assignment]


def pt2e_variant(factory: Any) -> Any:
    """The PT2E class of a recipe's ``with_args`` factory, with the same arguments."""
    cls = factory.p.func
    variant = {EQLearnableFakeQuantize: PT2ELearnableFakeQuantize, EQFakeQuantize: PT2EFakeQuantize}.get(cls)
    if variant is None:
        raise TypeError(f"no PT2E variant of {cls.__name__}; recipes build eqcore fake quantizers")
    return variant.with_args(**factory.p.keywords)
