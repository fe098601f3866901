"""CLE op rules: what may sit between two layers of a CLE pair, and which layer pairs fit.

Scaling channels across a pair is exact only through positively homogeneous ops
(``f(s x) = s f(x)`` for s > 0, e.g. ReLU). What may sit between two layers, and which layer
pairs are equalizable, is decided in one place: the op tables (`_MODULE_RULES`,
`_FUNCTION_RULES`, `_METHOD_RULES`, read by `_rule_for`) and `_pair_problem` for properties of
the two layers. Pair discovery (`eqcore.prepare.cle_pairs`) and equalization
(`eqcore.prepare.cle`) both read them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# How an op between two layers is treated:
#   "pass":    positively homogeneous per channel, the pair survives it;
#   "flatten": passes only when it does not merge channels (checked per pair in `_pair_problem`);
#   "break":   the pair is broken, `reason` says why.
_Verdict = Literal["pass", "flatten", "break"]


@dataclass(frozen=True)
class _OpRule:
    verdict: _Verdict
    reason: str


_HOMOGENEOUS = _OpRule("pass", "is positively homogeneous: f(s x) = s f(x) for s > 0")
_FLATTEN = _OpRule("flatten", "flattens to (N, C) only when the spatial size is 1")
_NOT_HOMOGENEOUS = _OpRule("break", "is not positively homogeneous")
_CLIPS = _OpRule(
    "break", "is not positively homogeneous (it clips at a fixed value; see relu6_to_relu)"
)
_RESIDUAL = _OpRule("break", "(residual) breaks the pair: it merges two branches")
_CONCAT = _OpRule("break", "(concatenation) breaks the pair: it merges branches")
_SCALES = _OpRule("break", "breaks the pair: it combines values with other tensors or constants")
_POOLING = _OpRule("break", "is pooling, which is not allowed between a CLE pair")
_UNFOLDED_BN = _OpRule(
    "break", "is an unfolded BatchNorm (not homogeneous): run float_convbn_to_conv first"
)
_RESHAPE = _OpRule("break", "reshapes the tensor and may move channels")

_MODULE_RULES: tuple[tuple[type[nn.Module], _OpRule], ...] = (
    (nn.ReLU, _HOMOGENEOUS),
    (nn.LeakyReLU, _HOMOGENEOUS),
    (nn.Identity, _HOMOGENEOUS),
    (nn.modules.dropout._DropoutNd, _HOMOGENEOUS),  # identity in eval mode, checked in _rule_for
    (nn.Flatten, _FLATTEN),
    (nn.ReLU6, _CLIPS),
    (nn.Hardtanh, _CLIPS),
    (nn.Sigmoid, _NOT_HOMOGENEOUS),
    (nn.Tanh, _NOT_HOMOGENEOUS),
    (nn.GELU, _NOT_HOMOGENEOUS),
    (nn.SiLU, _NOT_HOMOGENEOUS),
    (nn.Mish, _NOT_HOMOGENEOUS),
    (nn.Hardswish, _NOT_HOMOGENEOUS),
    (nn.Hardsigmoid, _NOT_HOMOGENEOUS),
    (nn.ELU, _NOT_HOMOGENEOUS),
    (nn.SELU, _NOT_HOMOGENEOUS),
    (nn.CELU, _NOT_HOMOGENEOUS),
    (nn.Softplus, _NOT_HOMOGENEOUS),
    (nn.modules.batchnorm._BatchNorm, _UNFOLDED_BN),
    (nn.modules.pooling._MaxPoolNd, _POOLING),
    (nn.modules.pooling._AvgPoolNd, _POOLING),
    (nn.modules.pooling._AdaptiveAvgPoolNd, _POOLING),
    (nn.modules.pooling._AdaptiveMaxPoolNd, _POOLING),
)

_FUNCTION_RULES: dict[Callable[..., object], _OpRule] = {
    F.relu: _HOMOGENEOUS,
    torch.relu: _HOMOGENEOUS,
    torch.relu_: _HOMOGENEOUS,
    F.relu_: _HOMOGENEOUS,
    F.leaky_relu: _HOMOGENEOUS,
    F.dropout: _HOMOGENEOUS,  # only with training=False, checked in _rule_for
    torch.flatten: _FLATTEN,
    F.relu6: _CLIPS,
    F.hardtanh: _CLIPS,
    torch.sigmoid: _NOT_HOMOGENEOUS,
    F.sigmoid: _NOT_HOMOGENEOUS,
    torch.tanh: _NOT_HOMOGENEOUS,
    F.tanh: _NOT_HOMOGENEOUS,
    F.gelu: _NOT_HOMOGENEOUS,
    F.silu: _NOT_HOMOGENEOUS,
    F.mish: _NOT_HOMOGENEOUS,
    F.hardswish: _NOT_HOMOGENEOUS,
    F.hardsigmoid: _NOT_HOMOGENEOUS,
    F.elu: _NOT_HOMOGENEOUS,
    F.softplus: _NOT_HOMOGENEOUS,
    operator.add: _RESIDUAL,
    operator.iadd: _RESIDUAL,
    torch.add: _RESIDUAL,
    operator.sub: _SCALES,
    operator.mul: _SCALES,
    operator.truediv: _SCALES,
    torch.mul: _SCALES,
    torch.cat: _CONCAT,
    torch.concat: _CONCAT,
    torch.stack: _CONCAT,
    F.max_pool1d: _POOLING,
    F.max_pool2d: _POOLING,
    F.max_pool3d: _POOLING,
    F.avg_pool1d: _POOLING,
    F.avg_pool2d: _POOLING,
    F.avg_pool3d: _POOLING,
    F.adaptive_avg_pool1d: _POOLING,
    F.adaptive_avg_pool2d: _POOLING,
    F.adaptive_avg_pool3d: _POOLING,
    F.adaptive_max_pool2d: _POOLING,
    F.batch_norm: _UNFOLDED_BN,
    torch.reshape: _RESHAPE,
}

# The same rules for the aten ops of a torch.export graph (the PT2E backend captures with it).
_aten = torch.ops.aten
_FUNCTION_RULES.update({
    _aten.relu.default: _HOMOGENEOUS,
    _aten.relu_.default: _HOMOGENEOUS,
    _aten.leaky_relu.default: _HOMOGENEOUS,
    _aten.leaky_relu_.default: _HOMOGENEOUS,
    _aten.dropout.default: _HOMOGENEOUS,  # only with train=False, checked in _rule_for
    _aten.flatten.using_ints: _FLATTEN,
    _aten.hardtanh.default: _CLIPS,
    _aten.hardtanh_.default: _CLIPS,
    **dict.fromkeys(
        (_aten.sigmoid.default, _aten.tanh.default, _aten.gelu.default, _aten.silu.default, _aten.silu_.default,
         _aten.mish.default, _aten.hardswish.default, _aten.hardswish_.default, _aten.hardsigmoid.default,
         _aten.elu.default, _aten.softplus.default),
        _NOT_HOMOGENEOUS,
    ),
    _aten.add.Tensor: _RESIDUAL,
    _aten.add_.Tensor: _RESIDUAL,
    _aten.sub.Tensor: _SCALES,
    _aten.mul.Tensor: _SCALES,
    _aten.div.Tensor: _SCALES,
    _aten.cat.default: _CONCAT,
    _aten.stack.default: _CONCAT,
    **dict.fromkeys(
        (_aten.max_pool1d.default, _aten.max_pool2d.default, _aten.max_pool3d.default, _aten.avg_pool1d.default,
         _aten.avg_pool2d.default, _aten.avg_pool3d.default, _aten.adaptive_avg_pool1d.default,
         _aten.adaptive_avg_pool2d.default, _aten.adaptive_avg_pool3d.default, _aten.mean.dim),
        _POOLING,
    ),
    _aten.batch_norm.default: _UNFOLDED_BN,
    **dict.fromkeys(
        (_aten.reshape.default, _aten.view.default, _aten.permute.default, _aten.transpose.int),
        _RESHAPE,
    ),
})

_METHOD_RULES: dict[str, _OpRule] = {
    "relu": _HOMOGENEOUS,
    "relu_": _HOMOGENEOUS,
    "flatten": _FLATTEN,
    "add": _RESIDUAL,
    "add_": _RESIDUAL,
    "mul": _SCALES,
    "mul_": _SCALES,
    "sigmoid": _NOT_HOMOGENEOUS,
    "tanh": _NOT_HOMOGENEOUS,
    "view": _RESHAPE,
    "reshape": _RESHAPE,
    "permute": _RESHAPE,
    "transpose": _RESHAPE,
}

_NOT_LISTED = _OpRule("break", "is not in the table of ops allowed between a CLE pair")


def _is_depthwise(module: nn.Module) -> bool:
    """A depthwise conv with channel multiplier 1: input channel i feeds only output channel i."""
    return (
        isinstance(module, _CONV_TYPES)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _grouping_problem(module: nn.Module) -> str | None:
    if not isinstance(module, _CONV_TYPES) or module.groups == 1 or _is_depthwise(module):
        return None
    if module.groups == module.in_channels:
        multiplier = module.out_channels // module.in_channels
        return (
            f"depthwise conv with channel multiplier {multiplier} (groups={module.groups}, "
            f"out_channels={module.out_channels}) is not equalizable"
        )
    return f"grouped conv (groups={module.groups}) is not equalizable"


def _pair_problem(
    first_name: str, first: nn.Module, second_name: str, second: nn.Module, *, flattened: bool
) -> str | None:
    """Why the layer pair ``first -> second`` cannot be equalized (None if it can)."""
    for name, module in ((first_name, first), (second_name, second)):
        problem = _grouping_problem(module)
        if problem is not None:
            return f"{name}: {problem}"
    if isinstance(first, _CONV_TYPES) and isinstance(second, nn.Linear) and not flattened:
        return (
            f"{second_name} (Linear) acts on the last axis of {first_name}'s output, "
            "not on its channels"
        )
    if isinstance(first, nn.Linear) and isinstance(second, _CONV_TYPES):
        return f"{second_name} (conv) after {first_name} (Linear): their channel axes differ"
    if _out_channels(first) != _in_channels(second):
        merged = " (flatten merged the channel axis with others)" if flattened else ""
        return (
            f"{first_name} has {_out_channels(first)} output channels but {second_name} has "
            f"{_in_channels(second)} input channels{merged}"
        )
    return None


def _flatten_keeps_channels(node: fx.Node, module: nn.Module | None) -> bool:
    """True for a flatten from axis 1 to the end, which keeps (N, C) channels when H*W... == 1."""
    if module is not None:
        start, end = module.start_dim, module.end_dim
    else:  # torch.flatten(x, start_dim=0, end_dim=-1) or x.flatten(start_dim=0, end_dim=-1)
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
    return start == 1 and end == -1


def _tensor_args(node: fx.Node) -> int:
    return sum(isinstance(a, fx.Node) for a in node.args) + sum(
        isinstance(a, fx.Node) for a in node.kwargs.values()
    )


def _describe(traced: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(traced.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)).strip("_")
    return str(node.target)


def _rule_for(traced: fx.GraphModule, node: fx.Node) -> tuple[str, _OpRule]:
    """How ``node`` is treated between two layers: (short description, rule)."""
    what = _describe(traced, node)
    module = traced.get_submodule(node.target) if node.op == "call_module" else None
    if module is not None:
        rule = next((r for t, r in _MODULE_RULES if isinstance(module, t)), _NOT_LISTED)
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training:
            return what, _OpRule("break", "is in training mode (random): call .eval() first")
        padding = getattr(module, "padding", 0)
        if isinstance(module, nn.modules.pooling._AvgPoolNd) and any(
            p != 0 for p in (padding if isinstance(padding, tuple) else (padding,))
        ):
            what = f"{what} (padding={module.padding})"
    elif node.op == "call_function":
        rule = _FUNCTION_RULES.get(node.target, _NOT_LISTED)
        if node.target is F.dropout or node.target is _aten.dropout.default:
            key = "training" if node.target is F.dropout else "train"
            training = node.kwargs.get(key, node.args[2] if len(node.args) > 2 else True)
            if training is not False:
                return what, _OpRule("break", "may be in training mode (random)")
    elif node.op == "call_method":
        rule = _METHOD_RULES.get(node.target, _NOT_LISTED)
    else:
        rule = _NOT_LISTED
    if rule is _RESIDUAL and _tensor_args(node) < 2:
        return f"{what} of a constant", _NOT_HOMOGENEOUS
    if rule.verdict == "flatten" and not _flatten_keeps_channels(node, module):
        return what, _OpRule("break", "flattens the batch axis or keeps trailing axes apart")
    if rule.verdict != "break" and len(node.all_input_nodes) != 1:
        return what, _OpRule("break", "has more than one tensor input")
    return what, rule
