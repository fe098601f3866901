"""Fold BatchNorm into the preceding Conv/Linear, for float FX graphs and for QAT-prepared models.

In eval mode a BatchNorm is a fixed per-channel affine map ``y = scale * x + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``, so it can
be folded into the weight and bias of the layer that feeds it:
``W' = W * scale[:, None, ...]``, ``b' = b * scale + shift``. Folding makes the weight tensors that
get quantized (and plotted) the ones the model really uses, and is a prerequisite for CLE.

Both passes require eval mode, because a training-mode BatchNorm normalises with batch statistics
and cannot be folded. The fold is computed in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.nn.qat as nnqat

__all__ = [
    "convbn_to_conv",
    "float_convbn_to_conv",
    "qat_convbn_to_conv",
]

# The BatchNorm type that can follow each layer type. SyncBatchNorm is accepted after any of them:
# in eval mode it is an ordinary BatchNorm of whatever rank its input has.
_BN_AFTER: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
    nn.Linear: nn.BatchNorm1d,
}


@dataclass(frozen=True)
class _Fold:
    """A BatchNorm as a per-channel affine map, in float64: ``bn(x) == scale * x + shift``."""

    scale: torch.Tensor
    shift: torch.Tensor

    @classmethod
    def from_bn(cls, bn: nn.modules.batchnorm._BatchNorm) -> _Fold:
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("a BatchNorm without running statistics cannot be folded")
        mean = bn.running_mean.detach().double()
        var = bn.running_var.detach().double()
        scale = torch.rsqrt(var + bn.eps)
        shift = -mean * scale
        if bn.weight is not None:
            gamma = bn.weight.detach().double()
            scale = scale * gamma
            shift = shift * gamma
        if bn.bias is not None:
            shift = shift + bn.bias.detach().double()
        return cls(scale=scale, shift=shift)

    def folded(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of ``bn(layer(x))``; output channels are on axis 0 of ``weight``."""
        w = weight.detach().double()
        shape = (-1,) + (1,) * (w.dim() - 1)
        new_w = w * self.scale.to(w.device).reshape(shape)
        b = (
            torch.zeros_like(self.shift)
            if bias is None
            else bias.detach().double().to(self.shift.device)
        )
        new_b = b * self.scale + self.shift
        return new_w.to(weight.dtype), new_b.to(device=weight.device, dtype=weight.dtype)


def _can_fold_bn(bn: nn.Module) -> bool:
    """True for a BatchNorm whose eval output is a fixed affine map (it has running stats)."""
    return (
        isinstance(bn, nn.modules.batchnorm._BatchNorm)
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def _bn_matches(layer: nn.Module, bn: nn.Module) -> bool:
    """True if ``bn`` normalises the output channels of ``layer`` (same rank and channels)."""
    for layer_type, bn_type in _BN_AFTER.items():
        if isinstance(layer, layer_type):
            channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            return isinstance(bn, (bn_type, nn.SyncBatchNorm)) and bn.num_features == channels
    return False


def call_counts(graph: fx.Graph) -> dict[str, int]:
    """How many times each submodule is called in ``graph`` (a module called twice cannot be
    rewritten for one of its uses alone)."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _training_error(fn: str, what: str, arg: str) -> ValueError:
    return ValueError(
        f"{fn} folds BatchNorm running statistics, which describe the model only in eval mode, "
        f"but {what} is in training mode: call {arg}.eval() first."
    )


PREACT_MEAN = "eq_preact_mean"
PREACT_STD = "eq_preact_std"


def _record_output_statistics(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Keep what the folded BatchNorm said about the layer's output: per channel, mean beta and
    standard deviation |gamma| (non-persistent buffers, so state dicts are unchanged).
    ``eqcore.prepare.bias_absorption.absorb_high_bias`` reads them; ``equalize`` rescales them with the channels."""
    reference = layer.weight.detach()
    channels = bn.num_features
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros(channels)
    gamma = bn.weight.detach().abs() if bn.weight is not None else torch.ones(channels)
    layer.register_buffer(PREACT_MEAN, beta.to(reference.device, reference.dtype).clone(), persistent=False)
    layer.register_buffer(PREACT_STD, gamma.to(reference.device, reference.dtype).clone(), persistent=False)


def float_convbn_to_conv(traced: fx.GraphModule, *, inplace: bool = False) -> fx.GraphModule:
    """Fold every BatchNorm that directly follows a Conv1d/2d/3d or Linear into that layer.

    A BatchNorm is folded when its input is the output of a ``call_module`` Conv (BatchNorm of the
    same rank) or Linear (BatchNorm1d, assumed to see ``(N, C)`` activations), that output has the
    BatchNorm as its only user, and the layer is called only once in the graph. The layer gets the
    folded weight and bias (a bias is created if it had none), the BatchNorm node is removed and
    the graph recompiled. ``affine=False`` BatchNorms fold as gamma = 1, beta = 0.

    The layer also keeps the BatchNorm's description of its output (per-channel mean beta and
    standard deviation |gamma|) as non-persistent buffers, for :func:`eqcore.prepare.bias_absorption.absorb_high_bias`.

    BatchNorms without running statistics (``track_running_stats=False``) normalise with batch
    statistics even in eval mode, so they cannot be folded: they are left in the graph unchanged.

    Raises ``ValueError`` if the model or a BatchNorm to fold is in training mode (call ``.eval()``
    first), ``TypeError`` if ``traced`` is not a ``torch.fx.GraphModule``.
    Returns a folded deep copy, or ``traced`` itself when ``inplace=True`` (note that
    ``fx.symbolic_trace`` shares parameters with the traced model, so that model changes too).
    """
    if not isinstance(traced, fx.GraphModule):
        raise TypeError(
            f"float_convbn_to_conv expects a torch.fx.GraphModule, got {type(traced).__name__}: "
            "trace the model with torch.fx.symbolic_trace(model) first."
        )
    if traced.training:
        raise _training_error("float_convbn_to_conv", "the model", "traced")

    folds: list[tuple[fx.Node, fx.Node]] = []
    calls = call_counts(traced.graph)
    for bn_node in traced.graph.nodes:
        if bn_node.op != "call_module" or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        bn = traced.get_submodule(bn_node.target)
        layer_node = bn_node.args[0]
        if not (
            _can_fold_bn(bn)
            and isinstance(layer_node, fx.Node)
            and layer_node.op == "call_module"
            and len(layer_node.users) == 1
            and calls[layer_node.target] == 1
            and _bn_matches(traced.get_submodule(layer_node.target), bn)
        ):
            continue
        if bn.training:
            raise _training_error("float_convbn_to_conv", f"BatchNorm {bn_node.target!r}", "traced")
        folds.append((layer_node, bn_node))

    model = traced if inplace else copy.deepcopy(traced)
    if not folds:
        return model
    nodes = {node.name: node for node in model.graph.nodes}
    for layer_node, bn_node in folds:
        layer_node, bn_node = nodes[layer_node.name], nodes[bn_node.name]
        layer = model.get_submodule(layer_node.target)
        bn = model.get_submodule(bn_node.target)
        weight, bias = _Fold.from_bn(bn).folded(layer.weight, layer.bias)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if layer.bias is None:
                layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
            else:
                layer.bias.copy_(bias)
        _record_output_statistics(layer, bn)
        bn_node.replace_all_uses_with(layer_node)
        model.graph.erase_node(bn_node)
        if not any(n.op == "call_module" and n.target == bn_node.target for n in model.graph.nodes):
            model.delete_submodule(bn_node.target)
    model.graph.lint()
    model.recompile()
    return model


def _plain_qat_type(module: nn.Module) -> type[nn.Module] | None:
    """The QAT module without BatchNorm that replaces a fused QAT Conv/Linear+BN(+ReLU) module."""
    table: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
        # ConvBnReLU subclasses ConvBn, so it must be looked up first.
        (nniqat.ConvBnReLU1d, nniqat.ConvReLU1d),
        (nniqat.ConvBnReLU2d, nniqat.ConvReLU2d),
        (nniqat.ConvBnReLU3d, nniqat.ConvReLU3d),
        (nniqat.ConvBn1d, nnqat.Conv1d),
        (nniqat.ConvBn2d, nnqat.Conv2d),
        (nniqat.ConvBn3d, nnqat.Conv3d),
        (nniqat.LinearBn1d, nnqat.Linear),
    )
    for fused_type, plain_type in table:
        if isinstance(module, fused_type):
            return plain_type
    return None


def _unused_weight_fake_quant(**_: object) -> nn.Module:
    # Placeholder factory so that building the replacement module does not construct (and then
    # throw away) a second weight fake-quant; the original one is attached afterwards.
    return nn.Identity()


def _plain_qat_module(fused: nn.Module, plain_type: type[nn.Module]) -> nn.Module:
    placeholder_qconfig = fused.qconfig._replace(weight=_unused_weight_fake_quant)
    if issubclass(plain_type, nn.Linear):
        plain = plain_type(
            fused.in_features, fused.out_features, bias=True, qconfig=placeholder_qconfig
        )
    else:
        plain = plain_type(
            fused.in_channels,
            fused.out_channels,
            fused.kernel_size,
            stride=fused.stride,
            padding=fused.padding,
            dilation=fused.dilation,
            groups=fused.groups,
            bias=True,
            padding_mode=fused.padding_mode,
            qconfig=placeholder_qconfig,
        )
    weight, bias = _Fold.from_bn(fused.bn).folded(fused.weight, fused.bias)
    plain.weight = nn.Parameter(weight, requires_grad=fused.weight.requires_grad)
    plain.bias = nn.Parameter(bias, requires_grad=fused.weight.requires_grad)
    plain.qconfig = fused.qconfig
    plain.weight_fake_quant = fused.weight_fake_quant
    plain.training = fused.training
    return plain


def qat_convbn_to_conv(fx_model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace QAT Conv+BN(+ReLU) modules by plain QAT Conv(+ReLU) modules with the BN folded in.

    ``prepare_qat_fx`` keeps BatchNorm inside ``torch.ao.nn.intrinsic.qat.ConvBn{1,2,3}d`` /
    ``ConvBnReLU{1,2,3}d`` (and ``LinearBn1d``), so the weight that is fake-quantized is
    ``W * gamma / std``, recomputed every step. This swaps each for
    ``torch.ao.nn.qat.Conv{1,2,3}d`` / ``torch.ao.nn.intrinsic.qat.ConvReLU{1,2,3}d``
    (``torch.ao.nn.qat.Linear``) holding exactly that folded weight and the folded bias. The
    fused module's own ``weight_fake_quant`` object (scale, zero point, observer state) and
    ``qconfig`` move to the replacement, so the fake quantizer sees the same weight as before and
    the eval output is unchanged. With ``inplace=False`` they are the deep copy's objects; with
    ``inplace=True`` the very objects of ``fx_model``.

    Works on any module tree (FX GraphModules keep their graph, since module names are unchanged).
    Raises ``ValueError`` unless the model and every fused module's BatchNorm are in eval mode.
    Returns a deep copy, or ``fx_model`` itself when ``inplace=True``.
    """
    if fx_model.training:
        raise _training_error("qat_convbn_to_conv", "the model", "fx_model")
    fused_modules = [
        (name, module, plain_type)
        for name, module in fx_model.named_modules()
        if (plain_type := _plain_qat_type(module)) is not None
    ]
    for name, module, _ in fused_modules:
        if module.training or module.bn.training:
            raise _training_error("qat_convbn_to_conv", f"module {name!r}", "fx_model")
        if not _can_fold_bn(module.bn):
            raise ValueError(
                f"qat_convbn_to_conv cannot fold {name!r}: its BatchNorm has no running statistics."
            )

    model = fx_model if inplace else copy.deepcopy(fx_model)
    for name, _, plain_type in fused_modules:
        fused = model.get_submodule(name)
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, _plain_qat_module(fused, plain_type))
    if isinstance(model, fx.GraphModule):
        model.recompile()
    return model


convbn_to_conv = qat_convbn_to_conv
