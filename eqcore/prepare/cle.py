"""Cross-layer equalization (CLE, Nagel et al. 2019, "Data-Free Quantization").

For two layers with only positively homogeneous ops between them (``f(s x) = s f(x)`` for
s > 0, e.g. ReLU), scaling output channel i of the first layer by 1/s_i and input channel i of the
second by s_i leaves the float model unchanged. Choosing ``s_i = sqrt(r1_i / r2_i)`` (r = per-channel max |W|)
gives both layers the same per-channel ranges, which makes per-tensor weight quantization lose much
less. Conv -> depthwise -> conv chains are equalized as triplets with the cube-root rule.

Pair discovery works on an FX graph (`find_cle_pairs`); every candidate that is rejected is reported
with a reason. What may sit between two layers, and which layer pairs are equalizable, is decided in
one place: the op tables (`_MODULE_RULES`, `_FUNCTION_RULES`, `_METHOD_RULES`, read by
`_rule_for`) and `_pair_problem` for properties of the two layers.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from eqcore.prepare.fusion import PREACT_MEAN, PREACT_STD
from eqcore.prepare.fusion import call_counts as _call_counts

__all__ = [
    "CLEPairs",
    "SkippedPair",
    "absorb_high_bias",
    "equalize",
    "find_cle_pairs",
    "get_previous_module_node",
    "relu6_to_relu",
]

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


@dataclass(frozen=True)
class SkippedPair:
    """A candidate CLE pair that `find_cle_pairs` rejected.

    ``previous``: the upstream weight layers that could have paired with ``module`` (several when a
    merge such as ``add`` lies between); ``module``: the layer left without a partner;
    ``node``: the FX node that breaks the pair, if an op (not a layer property) is the cause.
    """

    previous: tuple[str, ...]
    module: str
    reason: str
    node: str | None = None


@dataclass(eq=False)
class CLEPairs(Sequence):
    """Result of `find_cle_pairs`: the groups to equalize and the rejected candidates.

    Behaves like the plain list of groups the seed code builds (iterate, ``len``, index, and compare
    equal to a list of lists), so it can be passed straight to `equalize`.
    """

    pairs: list[list[str]] = field(default_factory=list)
    skipped: list[SkippedPair] = field(default_factory=list)

    def __iter__(self) -> Iterator[list[str]]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):  # type: ignore[override]
        return self.pairs[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CLEPairs):
            return self.pairs == other.pairs and self.skipped == other.skipped
        if isinstance(other, (list, tuple)):
            return self.pairs == [list(group) for group in other]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CLEPairs(pairs={self.pairs!r}, skipped=<{len(self.skipped)} candidates>)"

    def reasons_for(self, module: str) -> list[str]:
        """Reasons recorded for candidates that end in ``module`` or start from it."""
        return [s.reason for s in self.skipped if s.module == module or module in s.previous]


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
        if node.target is F.dropout:
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
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


@dataclass(frozen=True)
class _Link:
    previous: fx.Node
    flattened: bool


@dataclass(frozen=True)
class _Break:
    at: fx.Node | None  # the node that breaks the pair; None for a property of the layers
    describe: Callable[[str, str], str]  # (upstream names, module name) -> reason


def _layer_at(traced: fx.GraphModule, node: fx.Node, types: tuple[type[nn.Module], ...]) -> bool:
    return node.op == "call_module" and isinstance(traced.get_submodule(node.target), types)


def _trace_back(
    traced: fx.GraphModule,
    node: fx.Node,
    types: tuple[type[nn.Module], ...],
    calls: dict[str, int],
) -> _Link | _Break | None:
    """Walk from ``node``'s input to the previous layer; None when there is no upstream layer."""
    if not _layer_at(traced, node, types) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    value, flattened = node.args[0], False
    while True:
        if value.op in ("placeholder", "get_attr", "output"):
            return None
        n_users = len(value.users)
        if n_users > 1:
            label = value.target if value.op == "call_module" else value.name
            return _Break(value, lambda prev, module, label=label, n=n_users: (
                f"{label} output has {n} users: the fork between {prev} and {module} "
                "breaks the pair"))
        if _layer_at(traced, value, types):
            break
        what, rule = _rule_for(traced, value)
        if rule.verdict == "break":
            return _Break(value, lambda prev, module, what=what, why=rule.reason: (
                f"{what} between {prev} and {module} {why}"))
        flattened = flattened or rule.verdict == "flatten"
        value = value.all_input_nodes[0]

    for layer_node in (value, node):
        n_calls = calls.get(layer_node.target, 0)
        if n_calls > 1:
            return _Break(None, lambda prev, module, name=layer_node.target, n=n_calls: (
                f"{name} is called {n} times in the graph (shared weights): it cannot be "
                f"rescaled for the pair {prev} -> {module} alone"))
    problem = _pair_problem(
        value.target,
        traced.get_submodule(value.target),
        node.target,
        traced.get_submodule(node.target),
        flattened=flattened,
    )
    if problem is not None:
        return _Break(None, lambda prev, module, problem=problem: problem)
    return _Link(value, flattened)


def _upstream_layers(
    traced: fx.GraphModule, start: fx.Node, types: tuple[type[nn.Module], ...]
) -> tuple[str, ...]:
    """Nearest weight layers upstream of ``start`` (inclusive), through any op, in BFS order."""
    found: list[str] = []
    seen: set[fx.Node] = set()
    frontier = [start]
    while frontier:
        next_frontier: list[fx.Node] = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if _layer_at(traced, n, types):
                if n.target not in found:
                    found.append(n.target)
            else:
                next_frontier.extend(n.all_input_nodes)
        frontier = next_frontier
    return tuple(found)


def _format_names(names: tuple[str, ...]) -> str:
    shown = " / ".join(names[:3])
    return shown + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _check_types(types: tuple[type[nn.Module], ...]) -> tuple[type[nn.Module], ...]:
    types = tuple(types) if isinstance(types, (tuple, list)) else (types,)
    unsupported = [t for t in types if not issubclass(t, _LAYER_TYPES)]
    if unsupported:
        raise ValueError(
            f"CLE supports Conv1d/2d/3d and Linear layers, got {[t.__name__ for t in unsupported]}"
        )
    return types


def get_previous_module_node(
    traced: fx.GraphModule,
    node: fx.Node,
    types: type[nn.Module] | tuple[type[nn.Module], ...],
    CLE_compatible: bool = True,
) -> fx.Node | None:
    """The ``call_module`` node of type ``types`` that feeds ``node``, or None.

    With ``CLE_compatible=True`` (the default) the result is returned only if the two layers form
    an equalizable CLE pair: ``node`` is itself a layer of ``types``, only positively homogeneous
    ops lie between (see the tables in this module), every intermediate value has exactly one user,
    and the layers' channels line up (`find_cle_pairs` reports why a candidate is rejected).
    With ``CLE_compatible=False`` it walks back along first inputs through any op and returns the
    nearest layer of ``types``, ignoring what lies between.
    """
    types = tuple(types) if isinstance(types, (tuple, list)) else (types,)
    if CLE_compatible:
        link = _trace_back(traced, node, _check_types(types), _call_counts(traced.graph))
        return link.previous if isinstance(link, _Link) else None
    value = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    while value is not None:
        if _layer_at(traced, value, types):
            return value
        inputs = value.all_input_nodes
        value = inputs[0] if inputs else None
    return None


def find_cle_pairs(
    traced: fx.GraphModule,
    *,
    types: tuple[type[nn.Module], ...] = _LAYER_TYPES,
) -> CLEPairs:
    """Find the layer groups of an FX graph that CLE can equalize, and why others were rejected.

    Every layer of ``types`` is linked to the previous one when `get_previous_module_node` accepts
    the pair. A conv -> depthwise -> conv chain (depthwise: groups == in == out channels) becomes
    a triplet ``[conv, depthwise, conv]``; every other link is a pair ``[first, second]``. Groups
    are in graph order (a layer may be in two groups; `equalize` iterates to convergence). Rejected candidates (layers with an upstream layer but no valid link) are listed in
    ``skipped`` with the reason, e.g. ``"ReLU6 between a and b is not positively homogeneous ..."``.

    Fuse BatchNorms first (`eqcore.prepare.fusion.float_convbn_to_conv`): an unfused BN breaks every pair.
    """
    if not isinstance(traced, fx.GraphModule):
        raise TypeError(
            f"find_cle_pairs expects a torch.fx.GraphModule, got {type(traced).__name__}: "
            "trace the model with torch.fx.symbolic_trace(model) first."
        )
    types = _check_types(types)
    calls = _call_counts(traced.graph)
    position = {node.target: i for i, node in enumerate(traced.graph.nodes)
                if node.op == "call_module"}
    previous_of: dict[str, str] = {}
    skipped: list[SkippedPair] = []
    for node in traced.graph.nodes:
        result = _trace_back(traced, node, types, calls)
        if isinstance(result, _Link):
            previous_of[node.target] = result.previous.target
        elif isinstance(result, _Break):
            start = result.at if result.at is not None else node.args[0]
            upstream = _upstream_layers(traced, start, types)
            if not upstream:
                continue
            reason = result.describe(_format_names(upstream), node.target)
            skipped.append(SkippedPair(
                previous=upstream,
                module=node.target,
                reason=reason,
                node=result.at.name if result.at is not None else None,
            ))

    next_of = {prev: second for second, prev in previous_of.items()}
    in_triplet: set[tuple[str, str]] = set()
    groups: list[list[str]] = []
    for middle, first in previous_of.items():
        last = next_of.get(middle)
        if last is not None and _is_depthwise(traced.get_submodule(middle)):
            groups.append([first, middle, last])
            in_triplet.update({(first, middle), (middle, last)})
    groups.extend(
        [first, second] for second, first in previous_of.items()
        if (first, second) not in in_triplet
    )
    groups.sort(key=lambda g: [position[name] for name in g])
    return CLEPairs(pairs=groups, skipped=skipped)


def relu6_to_relu(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every ReLU6 (``nn.ReLU6`` modules, ``F.relu6`` calls in an FX graph) by ReLU.

    This CHANGES the model's function (activations above 6 are no longer clipped). The DFQ paper
    does it for MobileNetV2 because ReLU6 is not positively homogeneous and so blocks CLE; the
    changed model usually needs re-evaluation (or fine-tuning) before use.
    Returns a modified deep copy, or ``model`` itself when ``inplace=True``.
    """
    model = model if inplace else copy.deepcopy(model)
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.ReLU6)]
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, nn.ReLU(inplace=getattr(parent, child_name).inplace))
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target is F.relu6:
                node.target = F.relu
        model.recompile()
    return model


@dataclass
class _Layer:
    """A Conv/Linear weight seen as per-channel rows; scaling is done in float64."""

    name: str
    module: nn.Module

    @property
    def depthwise(self) -> bool:
        return _is_depthwise(self.module)

    def _weight(self) -> torch.Tensor:
        return self.module.weight.detach().double()

    def out_ranges(self) -> torch.Tensor:
        w = self._weight()
        return w.reshape(w.shape[0], -1).abs().amax(dim=1)

    def in_ranges(self) -> torch.Tensor:
        if self.depthwise:
            return self.out_ranges()
        w = self._weight().transpose(0, 1)
        return w.reshape(w.shape[0], -1).abs().amax(dim=1)

    def scale_out(self, s: torch.Tensor) -> None:
        """Output channel i (and bias i) divided by s_i."""
        w = self._weight()
        shape = (-1,) + (1,) * (w.dim() - 1)
        with torch.no_grad():
            self.module.weight.copy_(w / s.reshape(shape))
            if self.module.bias is not None:
                self.module.bias.copy_(self.module.bias.detach().double() / s)
            for name in (PREACT_MEAN, PREACT_STD):
                statistic = getattr(self.module, name, None)
                if isinstance(statistic, torch.Tensor):
                    statistic.copy_(statistic.double() / s)

    def scale_in(self, s: torch.Tensor) -> None:
        """Input channel i multiplied by s_i."""
        w = self._weight()
        if self.depthwise:
            shape = (-1,) + (1,) * (w.dim() - 1)
        else:
            shape = (1, -1) + (1,) * (w.dim() - 2)
        with torch.no_grad():
            self.module.weight.copy_(w * s.reshape(shape))


def _negligible(r: torch.Tensor, rtol: float) -> torch.Tensor:
    return (r <= rtol * r.max()) | ~torch.isfinite(r)


def _equalize_pair(first: _Layer, second: _Layer, rtol: float) -> float:
    r1, r2 = first.out_ranges(), second.in_ranges()
    s = torch.sqrt(r1 / r2)
    s = torch.where(_negligible(r1, rtol) | _negligible(r2, rtol), torch.ones_like(s), s)
    first.scale_out(s)
    second.scale_in(s)
    return (1 - s).abs().max().item()


def _equalize_triplet(first: _Layer, middle: _Layer, last: _Layer, rtol: float) -> float:
    """Cube-root rule: all three per-channel ranges become t = (r1 r2 r3)^(1/3).

    first: out channel i / s1 (s1 = r1 / t); depthwise: channel i * s1 / s2 (s2 = t / r3);
    last: in channel i * s2.
    """
    r1, r2, r3 = first.out_ranges(), middle.out_ranges(), last.in_ranges()
    skip = _negligible(r1, rtol) | _negligible(r2, rtol) | _negligible(r3, rtol)
    t = torch.pow(r1 * r2 * r3, 1.0 / 3.0)
    s1 = torch.where(skip, torch.ones_like(t), r1 / t)
    s2 = torch.where(skip, torch.ones_like(t), t / r3)
    first.scale_out(s1)
    middle.scale_in(s1)
    middle.scale_out(s2)
    last.scale_in(s2)
    return max((1 - s1).abs().max().item(), (1 - s2).abs().max().item())


def _resolve_groups(model: nn.Module, pairs: Sequence[Sequence[str]]) -> list[list[_Layer]]:
    groups: list[list[_Layer]] = []
    for group in pairs:
        names = [str(name) for name in group]
        if len(names) not in (2, 3):
            raise ValueError(f"a CLE group must name 2 or 3 layers, got {names}")
        layers = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError as exc:
                raise ValueError(f"CLE group {names}: the model has no submodule {name!r}") from exc
            if not isinstance(module, _LAYER_TYPES):
                raise ValueError(
                    f"CLE group {names}: {name!r} is a {type(module).__name__}; "
                    "only Conv1d/2d/3d and Linear can be equalized"
                )
            layers.append(_Layer(name, module))
        if len(layers) == 3 and not layers[1].depthwise:
            raise ValueError(
                f"CLE triplet {names}: the middle layer must be a depthwise conv "
                "(groups == in_channels == out_channels)"
            )
        for a, b in zip(layers, layers[1:]):
            problem = _pair_problem(a.name, a.module, b.name, b.module, flattened=True)
            if problem is not None:
                raise ValueError(f"CLE group {names} cannot be equalized: {problem}")
        groups.append(layers)
    return groups


def equalize(
    model: nn.Module,
    pairs: Sequence[Sequence[str]],
    threshold: float = 1e-4,
    inplace: bool = False,
    *,
    max_iter: int = 100,
    zero_range_rtol: float = 1e-8,
) -> nn.Module:
    """Cross-layer equalize ``pairs`` of ``model`` (our own implementation of DFQ's CLE).

    ``pairs`` holds ``[first, second]`` layer names (``first``'s output channels feed ``second``'s
    input channels through positively homogeneous ops only) or ``[conv, depthwise, conv]`` triplets,
    e.g. from `find_cle_pairs`. Pairs use ``s_i = sqrt(r1_i / r2_i)``, triplets the cube-root rule;
    ``s_i = 1`` where a range is at most ``zero_range_rtol`` times its layer's largest range (dead
    channels). All groups are swept repeatedly until ``max|1 - s| < threshold`` or ``max_iter``
    sweeps (then a RuntimeWarning says so). Scales are computed in float64.

    The float model's output is unchanged (up to rounding). Returns a deep copy unless ``inplace``.
    """
    if threshold <= 0 or max_iter < 1:
        raise ValueError(f"need threshold > 0 and max_iter >= 1, got {threshold}, {max_iter}")
    model = model if inplace else copy.deepcopy(model)
    groups = _resolve_groups(model, pairs)
    if not groups:
        return model
    deviation = math.inf
    for _ in range(max_iter):
        deviation = 0.0
        for group in groups:
            if len(group) == 2:
                step = _equalize_pair(group[0], group[1], zero_range_rtol)
            else:
                step = _equalize_triplet(group[0], group[1], group[2], zero_range_rtol)
            deviation = max(deviation, step)
        if deviation < threshold:
            return model
    warnings.warn(
        f"equalize did not converge in {max_iter} sweeps (max |1 - s| = {deviation:.3g} >= "
        f"threshold {threshold:.3g}); raise max_iter or threshold",
        RuntimeWarning,
        stacklevel=2,
    )
    return model


@dataclass(frozen=True)
class AbsorbedBias:
    """What :func:`absorb_high_bias` moved from ``first``'s bias into ``second``'s, per channel."""

    first: str
    second: str
    absorbed: torch.Tensor

    @property
    def channels(self) -> int:
        """How many channels gave up part of their bias."""
        return int((self.absorbed > 0).sum())


def _input_weight_sums(layer: _Layer) -> torch.Tensor:
    """(out, in) matrix M with layer(x + c) = layer(x) + M @ c for a per-channel constant c."""
    w = layer._weight()
    if layer.depthwise:
        return torch.diag(w.reshape(w.shape[0], -1).sum(1))
    return w.reshape(w.shape[0], w.shape[1], -1).sum(2)


def absorb_high_bias(
    model: nn.Module,
    pairs: Sequence[Sequence[str]],
    n_std: float = 3.0,
    inplace: bool = False,
) -> tuple[nn.Module, list[AbsorbedBias]]:
    """High-bias absorption (DFQ, Nagel et al. 2019): shrink large positive biases before ReLUs.

    For each ``[first, second]`` pair (triplets give two pairs) whose ``first`` layer kept its
    folded BatchNorm's output statistics (:func:`eqcore.prepare.fusion.float_convbn_to_conv` records
    them, :func:`equalize` rescales them), ``c_i = max(0, beta_i - n_std * gamma_i)`` is taken
    out of ``first``'s bias and its effect ``sum_k W2[:, i, k] * c_i`` added to ``second``'s (a
    bias is created if it had none). Between the two layers only positively homogeneous ops
    are allowed (what :func:`find_cle_pairs` pairs), so wherever ``first``'s output stays
    above ``c`` (all but about 0.1% of a Gaussian output at 3 std) the model's output is
    unchanged, exactly for Linear and unpadded convolutions; on a zero-padded convolution the
    border outputs also move by the taps that fall on the padding. The smaller activation
    range is what quantization gains. Pairs whose first layer has no statistics are skipped.

    Returns the model (a deep copy unless ``inplace``) and one :class:`AbsorbedBias` per pair
    that was treated.
    """
    if not (isinstance(n_std, (int, float)) and math.isfinite(n_std) and n_std >= 0):
        raise ValueError(f"n_std must be a finite number >= 0, got {n_std!r}")
    model = model if inplace else copy.deepcopy(model)
    report: list[AbsorbedBias] = []
    for group in _resolve_groups(model, pairs):
        for first, second in zip(group, group[1:]):
            mean = getattr(first.module, PREACT_MEAN, None)
            std = getattr(first.module, PREACT_STD, None)
            if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor) or first.module.bias is None:
                continue
            c = (mean.double() - n_std * std.double()).clamp_min(0.0)
            shift = _input_weight_sums(second) @ c
            with torch.no_grad():
                first.module.bias.copy_(first.module.bias.detach().double() - c)
                mean.copy_(mean.double() - c)
                if second.module.bias is None:
                    second.module.bias = nn.Parameter(
                        shift.to(second.module.weight.dtype), requires_grad=second.module.weight.requires_grad
                    )
                else:
                    second.module.bias.copy_(second.module.bias.detach().double() + shift)
            report.append(AbsorbedBias(first.name, second.name, c.float()))
    return model, report
