"""PT2E backend of preparation: torch.export capture and torchao ``prepare_qat_pt2e``.

``capture`` exports the model and gives its layers back as modules (`eqcore.prepare.export_graph`),
so BN folding and CLE run on it as on an FX graph. ``insert_quantizers`` lowers the layers to aten
ops again, lets torchao insert the fake quantizers that :class:`~eqcore.prepare.pt2e_rules.EQQuantizer`
asks for, then makes the result look like an FX-prepared model to every later stage: each
quantized layer is a torch.ao QAT module (``weight`` and ``weight_fake_quant``) at its original
module path, and each activation quantizer is named after the tensor it quantizes
(``layer1.0.conv1.output_quant``, ``blocks.0.add_quant``, ``input_quant``).
"""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Any

import torch
from torch import fx, nn

from eqcore._torch_ao import FakeQuantizeBase, QConfig
from eqcore.prepare.export_graph import (
    call_module_instead,
    export_model,
    layers_to_modules,
    modules_to_layers,
    set_submodule,
)
from eqcore.quant.recipes import Recipe

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    import torch.ao.nn.qat as nnqat

__all__ = ["capture", "insert_quantizers"]

aten = torch.ops.aten

_QAT_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: nnqat.Conv1d,
    nn.Conv2d: nnqat.Conv2d,
    nn.Conv3d: nnqat.Conv3d,
    nn.Linear: nnqat.Linear,
}


def capture(model: nn.Module, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    """The float model exported with torch.export, its conv / linear / BN calls as modules."""
    return layers_to_modules(export_model(model, example_inputs))


def insert_quantizers(
    float_model: fx.GraphModule, recipe: Recipe, example_inputs: tuple[Any, ...]
) -> fx.GraphModule:
    """torchao ``prepare_qat_pt2e`` with eqcore's quantizer on a copy of a captured model.

    ``example_inputs`` is unused (the graph was captured already); it keeps the FX backend's
    signature.
    """
    from eqcore._torchao import prepare_qat_pt2e
    from eqcore.prepare.pt2e_rules import EQQuantizer

    lowered = modules_to_layers(copy.deepcopy(float_model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        prepared = prepare_qat_pt2e(lowered, EQQuantizer(recipe))
    _layers_back(prepared, lowered)
    _name_quantizers(prepared)
    result = fx.GraphModule(prepared, prepared.graph)
    result.meta.update(float_model.meta)
    return result


def _is_quantizer(gm: fx.GraphModule, node: Any) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and isinstance(gm.get_submodule(node.target), FakeQuantizeBase)
    )


def _qat_module(module: nn.Module, weight_fake_quant: nn.Module) -> nn.Module:
    """The torch.ao QAT module of a float conv / linear, with this weight quantizer and the
    very same parameters."""
    qconfig = QConfig(activation=nn.Identity, weight=lambda **_: nn.Identity())
    qat_type = _QAT_TYPES[type(module)]
    if isinstance(module, nn.Linear):
        qat = qat_type(module.in_features, module.out_features, bias=module.bias is not None,
                       qconfig=qconfig, device="meta")
    else:
        qat = qat_type(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups,
            bias=module.bias is not None, padding_mode=module.padding_mode, qconfig=qconfig, device="meta",
        )
    qat.weight = module.weight
    if module.bias is not None:
        qat.bias = module.bias
    qat.weight_fake_quant = weight_fake_quant
    qat.eval()
    return qat


def _layers_back(gm: fx.GraphModule, lowered: fx.GraphModule) -> None:
    """Every conv / linear aten call that ``modules_to_layers`` made becomes a module call
    again: a QAT module where torchao fake-quantizes its weight, the float module otherwise.

    ``lowered`` is the graph torchao prepared; its modules hold the parameters ``gm`` reads.
    """
    layers = {name: m for name, m in lowered.named_modules() if type(m) in _QAT_TYPES}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or len(node.args) < 2:
            continue
        weight = node.args[1]
        quantizer = weight if _is_quantizer(gm, weight) else None
        source = quantizer.args[0] if quantizer is not None else weight
        if not (isinstance(source, fx.Node) and source.op == "get_attr"):
            continue
        path = source.target.rpartition(".")[0]
        if path not in layers:
            continue
        module = layers[path]
        if quantizer is not None:
            module = _qat_module(module, gm.get_submodule(quantizer.target))
        call_module_instead(gm, node, path, module)
        for leftover in (quantizer, source):
            if isinstance(leftover, fx.Node) and not leftover.users:
                gm.graph.erase_node(leftover)
        if quantizer is not None:
            delattr(gm, quantizer.target)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [value[0] for value in stack.values() if isinstance(value, tuple)]
    return paths[-1] if paths else ""


def _op_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0].rstrip("_")


_ACTIVATIONS = ("relu", "hardtanh")


def _tensor_name(gm: fx.GraphModule, node: fx.Node, inputs: int) -> str:
    """A readable, stable name for the tensor that ``node`` produces."""
    if node.op == "placeholder":
        return "input" if inputs == 1 else f"input_{node.name}"
    if node.op == "get_attr":
        return node.target
    if node.op == "call_module":
        return f"{node.target}.output"
    op = _op_name(node)
    source = node.args[0] if node.args else None
    if op in _ACTIVATIONS and isinstance(source, fx.Node) and len(source.users) == 1:
        if source.op == "call_module":
            return f"{source.target}.output"
        if source.op == "call_function":
            node, op = source, f"{_op_name(source)}_{op}"
    scope = _scope(node)
    return f"{scope}.{op}" if scope else op


def _name_quantizers(gm: fx.GraphModule) -> None:
    """Move torchao's ``activation_post_process_N`` modules to names of the tensors they quantize."""
    inputs = sum(
        1 for n in gm.graph.nodes
        if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_floating_point()
    )
    renamed: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in renamed:
            node.target = renamed[node.target]  # a quantizer torchao shares between edges
            continue
        if not _is_quantizer(gm, node) or "." in node.target:
            continue
        base = f"{_tensor_name(gm, node.args[0], inputs)}_quant"
        name, index = base, 1
        while _exists(gm, name):
            name, index = f"{base}_{index}", index + 1
        renamed[node.target] = name
        module = gm.get_submodule(node.target)
        delattr(gm, node.target)
        set_submodule(gm, name, module)
        node.target = name
    gm.graph.lint()


def _exists(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True
