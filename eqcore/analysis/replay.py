"""Toggling a prepared model's fake quantizers and re-running only what a toggle changes.

:class:`QuantizerFlags` captures every quantizer's fake-quant and observer flags (and every
module's training flag) so a sweep can put the model back exactly as it found it.

:class:`GraphReplay` makes per-layer sweeps cheap on a ``torch.fx.GraphModule`` (FX and
torch.export models): one full pass records every node's value, and a pass with a few
quantizers toggled re-executes only the nodes downstream of them, taking the rest from the
record. The replayed nodes run the same ops on the same values as ``model(x)``, so the result
is the same to the bit.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from eqcore._torch_ao import FakeQuantizeBase
from eqcore.analysis.layers import _op_name
from eqcore.quant.toggles import observer_is_on

__all__ = ["GraphReplay", "QuantizerFlags", "set_fake_quant"]

_IN_PLACE_OPERATORS = frozenset(
    {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
     operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
     operator.imatmul}
)


@dataclass
class QuantizerFlags:
    """Every quantizer's (fake quant, observer) flags and every module's training flag."""

    quantizers: list[tuple[nn.Module, bool, bool]]
    training: list[tuple[nn.Module, bool]]

    @classmethod
    def capture(cls, model: nn.Module) -> QuantizerFlags:
        return cls(
            quantizers=[
                (m, bool(m.fake_quant_enabled[0]), observer_is_on(m))
                for m in model.modules()
                if isinstance(m, FakeQuantizeBase)
            ],
            training=[(m, m.training) for m in model.modules()],
        )

    def freeze(self) -> None:
        """Eval mode and observers off: a sweep must not move the calibrated qparams."""
        for module, _ in self.training:
            module.training = False
        for quantizer, _, observing in self.quantizers:
            if observing:
                quantizer.enable_observer(False)

    def restore(self) -> None:
        for quantizer, fake_quant, observing in self.quantizers:
            if bool(quantizer.fake_quant_enabled[0]) != fake_quant:
                quantizer.enable_fake_quant(fake_quant)
            if observer_is_on(quantizer) != observing:
                quantizer.enable_observer(observing)
        for module, training in self.training:
            module.training = training


def set_fake_quant(quantizers: dict[str, nn.Module], enabled: Collection[str]) -> None:
    """Fake quantization on for the quantizers named in ``enabled``, off for every other one."""
    for name, quantizer in quantizers.items():
        on = name in enabled
        if bool(quantizer.fake_quant_enabled[0]) != on:
            quantizer.enable_fake_quant(on)


def _in_place(node: fx.Node, model: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return getattr(model.get_submodule(str(node.target)), "inplace", False) is True
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target in _IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True:
        return True
    name = _op_name(node.target)
    return name.endswith("_") and not name.startswith("_")


class _Partial(fx.Interpreter):
    """An interpreter whose in-place nodes copy the recorded values they would overwrite."""

    def __init__(self, module: fx.GraphModule, dirty: set[fx.Node], in_place: set[fx.Node]) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.dirty = dirty
        self.in_place = in_place

    def run_node(self, n: fx.Node) -> Any:
        if n in self.in_place:
            for source in n.all_input_nodes:
                value = self.env.get(source)
                if source not in self.dirty and isinstance(value, torch.Tensor):
                    self.env[source] = value.clone()
        return super().run_node(n)


class GraphReplay:
    """Re-runs the part of a GraphModule that toggling some quantizers changes.

    ``usable`` is False when the graph cannot be replayed safely: a quantizer runs where no graph
    node names it, or an in-place op overwrites a value that another node also reads.
    """

    def __init__(self, model: fx.GraphModule, quantizers: dict[str, nn.Module]) -> None:
        self.model = model
        self.nodes = list(model.graph.nodes)
        modules = [n for n in self.nodes if n.op == "call_module"]
        self.seeds: dict[str, list[fx.Node]] = {
            name: [n for n in modules if name == n.target or name.startswith(f"{n.target}.")] for name in quantizers
        }
        self.in_place = {n for n in self.nodes if _in_place(n, model)}
        shared_writes = any(len(n.all_input_nodes[0].users) > 1 for n in self.in_place if n.all_input_nodes)
        self.usable = all(self.seeds.values()) and not shared_writes
        self._dirty: dict[frozenset[str], set[fx.Node]] = {}

    def record(self, inputs: Sequence[Any]) -> tuple[Any, dict[fx.Node, Any]]:
        """A full pass; its output and every node's value."""
        interpreter = fx.Interpreter(self.model, garbage_collect_values=False)
        output = interpreter.run(*inputs)
        return output, interpreter.env

    def dirty(self, toggled: Collection[str]) -> set[fx.Node]:
        """The nodes whose value depends on a toggled quantizer."""
        key = frozenset(toggled)
        if key not in self._dirty:
            dirty = {n for name in key for n in self.seeds[name]} | {n for n in self.nodes if n.op == "output"}
            for node in self.nodes:
                if node not in dirty and any(source in dirty for source in node.all_input_nodes):
                    dirty.add(node)
            self._dirty[key] = dirty
        return self._dirty[key]

    def rerun(self, recorded: dict[fx.Node, Any], toggled: Collection[str], inputs: Sequence[Any]) -> Any:
        """The output of the model as recorded but with ``toggled`` quantizers' flags as set now."""
        dirty = self.dirty(toggled)
        initial = {n: value for n, value in recorded.items() if n not in dirty}
        interpreter = _Partial(self.model, dirty, self.in_place & dirty)
        return interpreter.run(*inputs, initial_env=initial)
