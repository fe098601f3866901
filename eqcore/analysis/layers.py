"""Which fake quantizers belong to which layer of a prepared model.

A *layer* is a quantized weighted op (conv, linear, ...) with its weight quantizer and the
activation quantizer that observes its output, after a fused activation function if there is
one. Per-layer sensitivity toggles exactly these quantizers, so a user can reproduce every
number by toggling the same names by hand.

In a ``torch.fx.GraphModule`` (the FX backend, and torch.export / PT2E, whose quantizers are
modules too) layers are read from the graph: a module with a ``weight_fake_quant`` (FX QAT
modules), or an op fed by a quantizer whose input is a parameter (PT2E); its output quantizer
is the quantizer its output reaches through activation functions only. Outside a graph, a
layer is a module with a ``weight_fake_quant`` and, if present, an ``activation_post_process``
child (torch.ao eager mode).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import fx, nn

from eqcore._torch_ao import FakeQuantizeBase
from eqcore.errors import EQError

__all__ = ["QuantizedLayer", "find_quantized_layers", "weight_quantizer_names"]

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid,
    nn.Tanh, nn.ELU, nn.Mish, nn.Identity, nn.Dropout,
)
ACTIVATION_OPS = frozenset(
    {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "gelu", "silu",
     "silu_", "hardswish", "hardswish_", "sigmoid", "tanh", "elu", "mish", "dropout", "identity"}
)
VIEW_OPS = frozenset({"t", "transpose", "permute", "view", "reshape", "expand", "contiguous", "clone"})


@dataclass(frozen=True)
class QuantizedLayer:
    """A weighted op and the fake quantizers that belong to it, by qualified module name.

    ``name`` is the op's module name (its weight's owner under torch.export); ``probe`` is the
    module whose output is the layer's output: the output quantizer, else the op's own module,
    else None (an op with no module and no output quantizer). ``input_quantizers`` quantize the
    op's input and belong to no layer (the model input, an add's output): they are not part of
    the layer's toggles, but a recipe set per layer usually configures them with it.
    """

    name: str
    weight_quantizer: str | None
    output_quantizer: str | None
    probe: str | None
    input_quantizers: tuple[str, ...] = ()

    @property
    def quantizers(self) -> tuple[str, ...]:
        return tuple(q for q in (self.weight_quantizer, self.output_quantizer) if q is not None)


def _op_name(target: object) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or str(target)
    return name.split(".")[0]


def _is_activation(node: fx.Node, model: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(str(node.target)), ACTIVATION_MODULES)
    if node.op in ("call_function", "call_method"):
        return _op_name(node.target) in ACTIVATION_OPS
    return False


def _parameter_source(node: fx.Node) -> fx.Node | None:
    """The get_attr node a quantizer's input comes from (through single-input ops), if any."""
    current = node
    for _ in range(8):
        inputs = current.all_input_nodes
        if len(inputs) != 1:
            return None
        current = inputs[0]
        if current.op == "get_attr":
            return current
    return None


def _consumer(node: fx.Node) -> fx.Node | None:
    """The op a quantized weight feeds, through view-like ops."""
    current = node
    for _ in range(8):
        users = list(current.users)
        if len(users) != 1:
            return None
        user = users[0]
        if user.op in ("call_function", "call_method") and _op_name(user.target) in VIEW_OPS:
            current = user
            continue
        return user
    return None


def _output_quantizer(op: fx.Node, model: fx.GraphModule, quantizers: dict[str, nn.Module]) -> str | None:
    current = op
    for _ in range(8):
        users = list(current.users)
        quantizing = [u for u in users if u.op == "call_module" and str(u.target) in quantizers]
        if len(quantizing) == 1:
            return str(quantizing[0].target)
        if len(users) != 1 or not _is_activation(users[0], model):
            return None
        current = users[0]
    return None


def _inputs(op: fx.Node, quantizers: dict[str, nn.Module]) -> tuple[str, ...]:
    return tuple(
        str(n.target) for n in op.all_input_nodes if n.op == "call_module" and str(n.target) in quantizers
    )


def _graph_layers(model: fx.GraphModule, quantizers: dict[str, nn.Module]) -> list[QuantizedLayer]:
    names = {id(module): name for name, module in quantizers.items()}
    layers = []
    for node in model.graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        module = model.get_submodule(target)
        weight_fq = getattr(module, "weight_fake_quant", None)
        if isinstance(weight_fq, FakeQuantizeBase) and id(weight_fq) in names:
            output = _output_quantizer(node, model, quantizers)
            layers.append(QuantizedLayer(target, names[id(weight_fq)], output, output or target, _inputs(node, quantizers)))
        elif target in quantizers:
            source = _parameter_source(node)
            op = _consumer(node) if source is not None else None
            if op is None or op.op == "output" or (op.op == "call_module" and str(op.target) in quantizers):
                continue
            owner = str(source.target)
            owner = owner.rsplit(".", 1)[0] if owner.endswith(".weight") else owner
            output = _output_quantizer(op, model, quantizers)
            probe = output or (str(op.target) if op.op == "call_module" else None)
            inputs = tuple(q for q in _inputs(op, quantizers) if q != target)
            layers.append(QuantizedLayer(owner, target, output, probe, inputs))
    first = {}
    for layer in layers:  # a module called twice is one layer: its first call's output quantizer
        first.setdefault(layer.name, layer)
    return _own_inputs(list(first.values()))


def _own_inputs(layers: list[QuantizedLayer]) -> list[QuantizedLayer]:
    """Keep only input quantizers no layer owns, each with the first layer that reads it."""
    owned = {q for layer in layers for q in layer.quantizers}
    result = []
    for layer in layers:
        inputs = tuple(q for q in layer.input_quantizers if q not in owned)
        owned.update(inputs)
        result.append(replace(layer, input_quantizers=inputs))
    return result


def _module_layers(model: nn.Module, quantizers: dict[str, nn.Module]) -> list[QuantizedLayer]:
    names = {id(module): name for name, module in quantizers.items()}
    layers = []
    for name, module in model.named_modules():
        weight_fq = getattr(module, "weight_fake_quant", None)
        if not isinstance(weight_fq, FakeQuantizeBase) or id(weight_fq) not in names:
            continue
        post = getattr(module, "activation_post_process", None)
        output = names.get(id(post)) if isinstance(post, FakeQuantizeBase) else None
        layers.append(QuantizedLayer(name, names[id(weight_fq)], output, output or name))
    return layers


def find_quantized_layers(model: nn.Module) -> list[QuantizedLayer]:
    """Every quantized weighted op of ``model`` with its quantizers, in execution (graph) order.

    EQError when the model has no fake quantizer, or a quantizer would belong to two layers.
    """
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizeBase)}
    if not quantizers:
        raise EQError(
            f"{type(model).__name__} has no fake-quant modules; prepare it first "
            "(eqcore.prepare_model or torch.ao's prepare_qat_fx)"
        )
    layers = _graph_layers(model, quantizers) if isinstance(model, fx.GraphModule) else _module_layers(model, quantizers)
    owners: dict[str, str] = {}
    for layer in layers:
        for quantizer in layer.quantizers:
            if quantizer in owners and owners[quantizer] != layer.name:
                raise EQError(
                    f"quantizer {quantizer} belongs to both {owners[quantizer]} and {layer.name}; "
                    "per-layer sensitivity needs each quantizer in one layer"
                )
            owners[quantizer] = layer.name
    return layers


def weight_quantizer_names(model: nn.Module, layers: list[QuantizedLayer] | None = None) -> set[str]:
    """Names of the quantizers that quantize weights: the layers' ones and every ``weight_fake_quant``."""
    names = {layer.weight_quantizer for layer in (layers or []) if layer.weight_quantizer is not None}
    by_id = {id(m): n for n, m in model.named_modules() if isinstance(m, FakeQuantizeBase)}
    for module in model.modules():
        weight_fq = getattr(module, "weight_fake_quant", None)
        if weight_fq is not None and id(weight_fq) in by_id:
            names.add(by_id[id(weight_fq)])
    return names

