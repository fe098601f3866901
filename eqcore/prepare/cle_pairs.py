"""CLE pair discovery: the layer groups of an FX graph that CLE can equalize, with reasons.

Pair discovery works on an FX graph (`find_cle_pairs`); every candidate that is rejected is
reported with a reason (`SkippedPair`, collected in `CLEPairs`). The walk from a layer back to
the previous one applies the rules of `eqcore.prepare.cle_rules` to every op on the way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from torch import fx, nn

from eqcore.prepare.cle_rules import _LAYER_TYPES, _is_depthwise, _pair_problem, _rule_for
from eqcore.prepare.fusion import call_counts as _call_counts

__all__ = [
    "CLEPairs",
    "SkippedPair",
    "find_cle_pairs",
    "get_previous_module_node",
]


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
    ops lie between (see the tables in `eqcore.prepare.cle_rules`), every intermediate value has exactly one user,
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
