"""Drop-in torch.ao fake-quant modules: EQLearnableFakeQuantize and EQFakeQuantize.

Same constructors, methods, buffers and state dict keys as torch.ao's ``_LearnableFakeQuantize``
and ``FakeQuantize``, with the numerics of ``eqcore.quant.functional`` (its module docstring),
and Python mirrors of the uint8 state buffers, so that forward reads no device memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from eqcore._torch_ao import FakeQuantizeBase, tq
from eqcore.quant.functional import (
    EPS,
    _check_scale_value,
    apply_fake_quantize,
    check_quant_range,
    grad_scaling_factor,
    learnable_fake_quantize,
    normalize_axis,
)
from eqcore.quant.fused import compiling


def _is_symmetric(qscheme: torch.qscheme) -> bool:
    return qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def _is_per_channel(qscheme: torch.qscheme) -> bool:
    return qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)


def _build_observer(observer: Any, quant_min: int, quant_max: int, observer_kwargs: dict) -> nn.Module:
    observer_kwargs = {**observer_kwargs, "quant_min": quant_min, "quant_max": quant_max}
    dtype = observer_kwargs.get("dtype") or getattr(getattr(observer, "p", None), "keywords", {}).get("dtype")
    if dtype is not None and dtype in (torch.quint8, torch.qint8, torch.qint32, torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if quant_min < info.min or quant_max > info.max:
            raise ValueError(
                f"quant_min..quant_max ({quant_min}..{quant_max}) does not fit the observer dtype "
                f"{dtype} ({info.min}..{info.max}); pass a wider dtype, e.g. dtype=torch.qint32"
            )
    return observer(**observer_kwargs)


class _FlagsMixin:
    """Python mirrors of the uint8 state buffers, so forward reads no device memory."""

    def _sync_flags(self) -> None:
        self._fake_quant_on = bool(self.fake_quant_enabled[0])
        self._observer_on = bool(self._observer_buffer()[0])

    def _observer_buffer(self) -> torch.Tensor:
        return self.observer_enabled

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_flags()

    def enable_fake_quant(self, enabled: bool = True) -> None:
        self.fake_quant_enabled[0] = int(enabled)
        self._fake_quant_on = bool(enabled)

    def toggle_fake_quant(self, enabled: bool = True):  # noqa: ANN201
        self.enable_fake_quant(enabled)
        return self


class EQLearnableFakeQuantize(_FlagsMixin, FakeQuantizeBase):
    """Learnable fake quantizer, a drop-in for torch.ao's ``_LearnableFakeQuantize``.

    Same constructor, methods, buffers and state dict keys; faster and exact at the edges (see
    the module docstring). Modes: static estimation (observer sets scale/zero point), param
    learning (scale/zero point trained by backprop), static observation (observe, no fake quant).
    """

    def __init__(
        self,
        observer: Any = tq.MovingAverageMinMaxObserver,
        quant_min: int = 0,
        quant_max: int = 255,
        scale: float = 1.0,
        zero_point: float = 0.0,
        channel_len: int = -1,
        use_grad_scaling: bool = False,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__()
        check_quant_range(quant_min, quant_max)
        _check_scale_value(scale)
        if not (channel_len == -1 or (isinstance(channel_len, int) and channel_len > 0)):
            raise ValueError(f"channel_len must be -1 (per tensor) or a positive int, got {channel_len!r}")
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.use_grad_scaling = use_grad_scaling
        count = 1 if channel_len == -1 else channel_len
        self.channel_len = channel_len
        self.scale = nn.Parameter(torch.full((count,), float(scale)))
        self.zero_point = nn.Parameter(torch.full((count,), float(zero_point)))
        self.activation_post_process = _build_observer(observer, quant_min, quant_max, observer_kwargs)
        self.dtype = self.activation_post_process.dtype
        self.qscheme = self.activation_post_process.qscheme
        self.ch_axis = getattr(self.activation_post_process, "ch_axis", -1)
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("static_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("learning_enabled", torch.tensor([0], dtype=torch.uint8))
        self.bitwidth = int(math.log2(quant_max - quant_min + 1))
        self.register_buffer("eps", torch.tensor([EPS]))
        if _is_symmetric(self.qscheme):
            self.zero_point.data.zero_()
        self._sync_flags()

    def _observer_buffer(self) -> torch.Tensor:
        return self.static_enabled

    def _sync_flags(self) -> None:
        super()._sync_flags()
        self._learning_on = bool(self.learning_enabled[0])

    @property
    def is_per_channel(self) -> bool:
        return _is_per_channel(self.qscheme)

    def enable_param_learning(self) -> EQLearnableFakeQuantize:
        """Learn scale and zero point by backprop; the observer stops updating them."""
        self.toggle_qparam_learning(enabled=True).toggle_fake_quant(enabled=True).toggle_observer_update(enabled=False)
        return self

    def enable_static_estimate(self) -> EQLearnableFakeQuantize:
        """Let the observer set scale and zero point (PTQ calibration); output is fake-quantized."""
        self.toggle_qparam_learning(enabled=False).toggle_fake_quant(enabled=True).toggle_observer_update(enabled=True)
        return self

    def enable_static_observation(self) -> EQLearnableFakeQuantize:
        """Observe data without updating qparams; output is the unquantized input."""
        self.toggle_qparam_learning(enabled=False).toggle_fake_quant(enabled=False).toggle_observer_update(enabled=True)
        return self

    def toggle_observer_update(self, enabled: bool = True) -> EQLearnableFakeQuantize:
        self.static_enabled[0] = int(enabled)
        self._observer_on = bool(enabled)
        return self

    def enable_observer(self, enabled: bool = True) -> None:
        self.toggle_observer_update(enabled)

    def toggle_qparam_learning(self, enabled: bool = True) -> EQLearnableFakeQuantize:
        self.learning_enabled[0] = int(enabled)
        self._learning_on = bool(enabled)
        self.scale.requires_grad = enabled
        self.zero_point.requires_grad = enabled
        return self

    def observe_quant_params(self) -> None:
        print(f"EQLearnableFakeQuantize Scale: {self.scale.detach()}")
        print(f"EQLearnableFakeQuantize Zero Point: {self.zero_point.detach()}")

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current (scale, integer zero point), the zero point rounded half to even and clamped."""
        self.scale.data.clamp_(min=EPS)
        scale = self.scale.detach()
        zero_point = torch.round(self.zero_point.detach()).clamp(self.quant_min, self.quant_max).long()
        return scale, zero_point

    def _observe(self, x: torch.Tensor) -> None:
        self.activation_post_process(x.detach())
        scale, zero_point = self.activation_post_process.calculate_qparams()
        scale = scale.to(self.scale.device, self.scale.dtype).reshape(-1)
        zero_point = zero_point.to(self.zero_point.device, self.zero_point.dtype).reshape(-1)
        if scale.shape != self.scale.shape:
            if self.channel_len != -1:
                raise ValueError(
                    f"channel_len={self.channel_len} does not match the {scale.numel()} channels "
                    f"the observer saw; set channel_len to the number of channels"
                )
            self.scale.data = scale.clone()
            self.zero_point.data = zero_point.clone()
        else:
            self.scale.data.copy_(scale)
            self.zero_point.data.copy_(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_channel = self.is_per_channel
        if per_channel and self.channel_len != -1:
            axis = normalize_axis(self.ch_axis, x.dim())
            if x.shape[axis] != self.channel_len:
                raise ValueError(
                    f"channel_len={self.channel_len} does not match the input's {x.shape[axis]} "
                    f"channels on axis {self.ch_axis} (input shape {tuple(x.shape)})"
                )
        # Eagerly, forward keeps the parameters in range as torch's module does (scale >= eps, a
        # symmetric zero point 0). A compiled forward writes no parameter: in-place writes make
        # extra graph outputs and copies, and keep CUDA graphs off; it uses the same values.
        compiled = compiling()
        if self._observer_on:
            self._observe(x)
        elif not compiled:
            self.scale.data.clamp_(min=EPS)
        if not self._fake_quant_on:
            return x
        symmetric = _is_symmetric(self.qscheme)
        if symmetric and not compiled:
            self.zero_point.data.zero_()
        grad_factor = grad_scaling_factor(x.numel(), self.quant_max) if self.use_grad_scaling else 1.0
        # Symmetric schemes pin z = 0: its gradient is 0 (an optimizer cannot move it), but it
        # gets one, like torch's module (the seeds assert every parameter has a .grad). Adding
        # 0 * z (exactly 0) to the scale links it to the graph at the cost of one tiny op.
        scale, zero_point = self.scale, self.zero_point
        if symmetric:
            zero_point = torch.zeros_like(self.zero_point) if compiled else self.zero_point.detach()
            if self.zero_point.requires_grad and torch.is_grad_enabled():
                scale = torch.add(self.scale, self.zero_point, alpha=0)
        return learnable_fake_quantize(
            x,
            scale,
            zero_point,
            self.quant_min,
            self.quant_max,
            ch_axis=self.ch_axis if per_channel else None,
            grad_factor=grad_factor,
        )

    def extra_repr(self) -> str:
        return (
            f"quant_min={self.quant_min}, quant_max={self.quant_max}, qscheme={self.qscheme}, "
            f"ch_axis={self.ch_axis}, channels={self.scale.numel()}, "
            f"use_grad_scaling={self.use_grad_scaling}, fake_quant={self._fake_quant_on}, "
            f"observer={self._observer_on}, learning={self._learning_on}"
        )


class EQFakeQuantize(_FlagsMixin, FakeQuantizeBase):
    """Non-learnable fake quantizer, a drop-in for torch.ao's ``FakeQuantize``.

    Qparams come from the observer while it is enabled; the state dict matches ``FakeQuantize``.
    """

    def __init__(
        self,
        observer: Any = tq.MovingAverageMinMaxObserver,
        quant_min: int = 0,
        quant_max: int = 255,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__()
        check_quant_range(quant_min, quant_max)
        self.activation_post_process = _build_observer(observer, quant_min, quant_max, observer_kwargs)
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.dtype = self.activation_post_process.dtype
        self.qscheme = self.activation_post_process.qscheme
        self.ch_axis = getattr(self.activation_post_process, "ch_axis", -1)
        self.is_per_channel = _is_per_channel(self.qscheme)
        self.register_buffer("scale", torch.tensor([1.0], dtype=torch.float))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int))
        self._sync_flags()

    def enable_observer(self, enabled: bool = True) -> None:
        self.observer_enabled[0] = int(enabled)
        self._observer_on = bool(enabled)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.activation_post_process.calculate_qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer_on:
            self.activation_post_process(x.detach())
            scale, zero_point = self.calculate_qparams()
            scale = scale.to(self.scale.device)
            zero_point = zero_point.to(self.zero_point.device)
            if self.scale.shape != scale.shape:
                self.scale.resize_(scale.shape)
                self.zero_point.resize_(zero_point.shape)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        if not self._fake_quant_on:
            return x
        return apply_fake_quantize(
            x,
            self.scale,
            self.zero_point,
            self.quant_min,
            self.quant_max,
            normalize_axis(self.ch_axis, x.dim()) if self.is_per_channel else None,
        )

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("scale", "zero_point"):
            value = state_dict.get(prefix + name)
            if value is not None:
                getattr(self, name).resize_(value.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"quant_min={self.quant_min}, quant_max={self.quant_max}, qscheme={self.qscheme}, "
            f"ch_axis={self.ch_axis}, fake_quant={self._fake_quant_on}, observer={self._observer_on}"
        )
