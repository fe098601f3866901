"""Named quantization recipes: plain data a user can read, copy and extend.

A :class:`Recipe` is a weight and an activation :class:`QuantizerSpec`. ``recipe.qconfig_mapping
(model)`` builds the torch.ao ``QConfigMapping`` the seeds build by hand: one ``QConfig`` per
Conv/Linear module, so per-channel weight quantizers know their channel count. Unlike the seeds'
loop (which only looks at ``out_channels``), Linear layers are quantized too.

    from dataclasses import replace
    my_recipe = replace(get_recipe("w8a8"), name="w8a8-mse",
                        activation=replace(W8A8.activation, observer="mse"))

The tutorials' qconfig helpers (``learnable_act``, ``learnable_weights``, ``fake_quant_act``,
``fake_quant_weight``) live here too: the same seed qconfig, spelled as the tutorials spell it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from eqcore._torch_ao import QConfig, QConfigMapping, tq
from eqcore.errors import EQError
from eqcore.quant.functional import check_quant_range
from eqcore.quant.modules import EQFakeQuantize, EQLearnableFakeQuantize
from eqcore.quant.observers import KLObserver, MSEObserver, PercentileObserver

OBSERVERS: dict[str, Any] = {
    "minmax": tq.MinMaxObserver,
    "moving_average": tq.MovingAverageMinMaxObserver,
    "histogram": tq.HistogramObserver,
    "per_channel_minmax": tq.PerChannelMinMaxObserver,
    "moving_average_per_channel": tq.MovingAveragePerChannelMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
}


@dataclass(frozen=True)
class QuantizerSpec:
    """How one tensor kind (weights or activations) is fake-quantized."""

    bits: int
    symmetric: bool
    per_channel: bool
    observer: str
    signed: bool
    learnable: bool = True
    use_grad_scaling: bool = True
    ch_axis: int = 0
    observer_kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise EQError(f"unknown observer {self.observer!r}; choose one of {sorted(OBSERVERS)}")
        check_quant_range(*self.quant_range)

    @property
    def quant_range(self) -> tuple[int, int]:
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @property
    def qscheme(self) -> torch.qscheme:
        if self.per_channel:
            return torch.per_channel_symmetric if self.symmetric else torch.per_channel_affine
        return torch.per_tensor_symmetric if self.symmetric else torch.per_tensor_affine

    @property
    def dtype(self) -> torch.dtype:
        if self.bits > 8:
            return torch.qint32
        return torch.qint8 if self.signed else torch.quint8

    def factory(self, channels: int | None = None) -> Any:
        """A ``with_args`` constructor for a torch.ao ``QConfig``."""
        qmin, qmax = self.quant_range
        kwargs: dict[str, Any] = dict(
            observer=OBSERVERS[self.observer],
            quant_min=qmin,
            quant_max=qmax,
            dtype=self.dtype,
            qscheme=self.qscheme,
            **dict(self.observer_kwargs),
        )
        if self.per_channel:
            kwargs["ch_axis"] = self.ch_axis
        if not self.learnable:
            return EQFakeQuantize.with_args(**kwargs)
        kwargs.update(scale=1.0, zero_point=0.0, use_grad_scaling=self.use_grad_scaling)
        if self.per_channel and channels is not None:
            kwargs["channel_len"] = channels
        return EQLearnableFakeQuantize.with_args(**kwargs)


@dataclass(frozen=True)
class Recipe:
    """A named pair of weight and activation quantizer specs."""

    name: str
    weight: QuantizerSpec
    activation: QuantizerSpec
    description: str = ""
    layer_types: tuple[type[nn.Module], ...] = field(
        default=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear), compare=False, repr=False
    )

    def qconfig(self, channels: int | None) -> QConfig:
        return QConfig(activation=self.activation.factory(), weight=self.weight.factory(channels))

    def for_layer(self, name: str) -> Recipe:
        """The recipe of the layer (module) ``name``: this one; a mixed recipe picks per layer."""
        return self

    def qconfig_mapping(self, model: nn.Module) -> QConfigMapping:
        """One QConfig per quantizable layer, named, like the seeds' loop."""
        mapping = QConfigMapping()
        for name, module in model.named_modules():
            if isinstance(module, self.layer_types):
                channels = getattr(module, "out_channels", None) or getattr(module, "out_features", None)
                mapping.set_module_name(name, self.for_layer(name).qconfig(channels))
        return mapping

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (stored with baselines)."""
        data = asdict(self)
        data.pop("layer_types", None)
        for key in ("weight", "activation"):
            data[key]["observer_kwargs"] = dict(data[key]["observer_kwargs"])
        return data


W8A8 = Recipe(
    name="w8a8",
    description="The seeds' qconfig: per-channel symmetric int8 learnable weights, "
    "per-tensor affine uint8 learnable activations with a histogram observer.",
    weight=QuantizerSpec(bits=8, symmetric=True, per_channel=True, observer="per_channel_minmax", signed=True),
    activation=QuantizerSpec(bits=8, symmetric=False, per_channel=False, observer="histogram", signed=False),
)

W8A8_PERTENSOR = Recipe(
    name="w8a8-pertensor",
    description="Per-tensor symmetric int8 weights (where CLE helps most), uint8 activations.",
    weight=QuantizerSpec(bits=8, symmetric=True, per_channel=False, observer="minmax", signed=True),
    activation=W8A8.activation,
)

W4A8 = Recipe(
    name="w4a8",
    description="Per-channel symmetric int4 weights, per-tensor affine uint8 activations.",
    weight=QuantizerSpec(bits=4, symmetric=True, per_channel=True, observer="per_channel_minmax", signed=True),
    activation=W8A8.activation,
)

W4A4 = Recipe(
    name="w4a4",
    description="Per-channel symmetric int4 weights, per-tensor affine uint4 activations.",
    weight=W4A8.weight,
    activation=QuantizerSpec(bits=4, symmetric=False, per_channel=False, observer="histogram", signed=False),
)

W8A8_MSE = Recipe(
    name="w8a8-mse",
    description="w8a8 with MSE-optimal activation ranges.",
    weight=W8A8.weight,
    activation=QuantizerSpec(bits=8, symmetric=False, per_channel=False, observer="mse", signed=False),
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (W8A8, W8A8_PERTENSOR, W4A8, W4A4, W8A8_MSE)}


def get_recipe(recipe: str | Recipe) -> Recipe:
    """A recipe by name (or the recipe itself); unknown names list the known ones."""
    if isinstance(recipe, Recipe):
        return recipe
    try:
        return RECIPES[recipe]
    except KeyError:
        raise EQError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}") from None


def learnable_act(range: float) -> Any:
    """The tutorials' learnable activation quantizer: per-tensor affine uint8, histogram observer.

    A ``with_args`` constructor for a ``tq.QConfig``; the initial scale is ``range / 255`` (the
    observer resets it on the first calibration pass). It builds eqcore's
    :class:`EQLearnableFakeQuantize`, where the tutorial's ``utils.qconfigs`` built torch's
    ``_LearnableFakeQuantize``; the SA hooks and plots accept both.
    """
    if isinstance(range, bool) or not isinstance(range, (int, float)) or not 0 < range < math.inf:
        raise EQError(f"learnable_act: range must be a positive number (the activation range the "
                      f"initial scale range / 255 covers), got {range!r}")
    return EQLearnableFakeQuantize.with_args(
        observer=tq.HistogramObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
        scale=range / 255.0,
        zero_point=0.0,
        use_grad_scaling=True,
    )


def learnable_weights(channels: int) -> Any:
    """The tutorials' learnable weight quantizer: per-channel symmetric int8, initial scale 0.1.

    ``channels`` is the layer's output channel count (``channel_len``), as learnable per-channel
    qparams need it up front. Builds :class:`EQLearnableFakeQuantize` (the tutorial's built
    torch's ``_LearnableFakeQuantize``).
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise EQError(f"learnable_weights: channels must be a positive int (the layer's "
                      f"out_channels), got {channels!r}")
    return EQLearnableFakeQuantize.with_args(
        observer=tq.PerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        scale=0.1,
        zero_point=0.0,
        use_grad_scaling=True,
        channel_len=channels,
    )


# The tutorials' non-learnable constructors: :class:`EQFakeQuantize` (torch's ``FakeQuantize`` in
# the tutorial's ``utils.qconfigs``), qparams set by the observer only.
fake_quant_act = EQFakeQuantize.with_args(
    observer=tq.HistogramObserver,
    quant_min=0,
    quant_max=255,
    dtype=torch.quint8,
    qscheme=torch.per_tensor_affine,
)
fake_quant_weight = EQFakeQuantize.with_args(
    observer=tq.PerChannelMinMaxObserver,
    quant_min=-128,
    quant_max=127,
    dtype=torch.qint8,
    qscheme=torch.per_channel_symmetric,
    ch_axis=0,
)
