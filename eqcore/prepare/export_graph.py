"""torch.export capture, and the exported aten graph with its layers as modules and back.

An exported graph has no modules: ``conv2d(x, get_attr('layer1.0.conv1.weight'), ...)``.
eqcore's stages (BN folding, CLE, weight histograms, per-layer SQNR) work on layer modules, so
:func:`layers_to_modules` turns every conv / linear / batch-norm aten call with parameter
arguments into a ``call_module`` of a real ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d``
at the original module path (the weight's own name), holding the very same tensors.
:func:`modules_to_layers` is the inverse, for torchao's PT2E prepare, which annotates aten ops.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from eqcore.errors import EQError

__all__ = ["CONV_OPS", "call_module_instead", "export_model", "layers_to_modules", "modules_to_layers", "set_submodule"]

aten = torch.ops.aten

# aten convolution op -> its layer type (pt2e_rules adds linear for its weighted ops).
CONV_OPS: dict[Any, type[nn.Module]] = {
    aten.conv1d.default: nn.Conv1d,
    aten.conv1d.padding: nn.Conv1d,
    aten.conv2d.default: nn.Conv2d,
    aten.conv2d.padding: nn.Conv2d,
    aten.conv3d.default: nn.Conv3d,
    aten.conv3d.padding: nn.Conv3d,
}
_CONV_OP_OF = {nn.Conv1d: aten.conv1d, nn.Conv2d: aten.conv2d, nn.Conv3d: aten.conv3d}
_BN_OF_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _dynamic_batch(example_inputs: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Example inputs with a batch of at least 2 (torch.export specializes size 1), and a dynamic
    batch axis for every tensor."""
    inputs, shapes = [], []
    for value in example_inputs:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape[0] == 1:
                value = torch.cat([value, value])
            shapes.append({0: torch.export.Dim.AUTO})
        else:
            shapes.append(None)
        inputs.append(value)
    return tuple(inputs), tuple(shapes)


_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export", "torch._export")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export prints the partial graph and logs warnings when it fails; the EQError says it
    in one line instead."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def failure_reason(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception, with its type, shortened for a one-line message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def export_model(model: nn.Module, example_inputs: tuple[Any, ...]) -> fx.GraphModule:
    """``torch.export.export(...).module()`` of a copy of ``model`` (eval mode, dynamic batch).

    The copy keeps the caller's model untouched by later folding. EQError when export fails.
    """
    model = copy.deepcopy(model).eval()
    inputs, shapes = _dynamic_batch(tuple(example_inputs))
    try:
        with _quiet():
            exported = torch.export.export(model, inputs, dynamic_shapes=shapes)
    except Exception as exc:  # export raises many types; all mean the same to the user
        raise EQError(
            f"{type(model).__name__} cannot be captured with torch.export ({failure_reason(exc)}); "
            "make its forward free of data-dependent Python control flow (see torch.export's "
            "troubleshooting guide), or register a traceable factory for it"
        ) from exc
    # A plain GraphModule: the exported one refuses .eval() and .train(), which every stage calls.
    module = exported.module()
    graph_module = fx.GraphModule(module, module.graph)
    graph_module.meta.update(module.meta)
    return graph_module


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path``, creating empty parent modules where none exist."""
    parent = root
    *parents, leaf = path.split(".")
    for part in parents:
        child = getattr(parent, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    if leaf in parent._modules:
        parent._modules[leaf] = module
    else:
        if hasattr(parent, leaf):
            delattr(parent, leaf)
        parent.add_module(leaf, module)


def call_module_instead(gm: fx.GraphModule, node: fx.Node, path: str, module: nn.Module) -> fx.Node:
    """Install ``module`` at ``path`` and put a call of it on ``node``'s first argument in
    ``node``'s place (keeping its meta); returns the call."""
    set_submodule(gm, path, module)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(path, (node.args[0],))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return call


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _attr(gm: fx.GraphModule, value: Any) -> torch.Tensor | None:
    """The parameter or buffer a ``get_attr`` node reads (None for anything else)."""
    if not (isinstance(value, fx.Node) and value.op == "get_attr"):
        return None
    owner_path, _, name = value.target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    return owner._parameters.get(name) if name in owner._parameters else owner._buffers.get(name)


def _owner_path(target: str) -> str:
    return target.rpartition(".")[0]


def _replaceable(gm: fx.GraphModule, path: str, names: set[str]) -> bool:
    """True when ``path`` is a bare container of exactly these tensors (what export leaves)."""
    if not path:
        return False
    try:
        owner = gm.get_submodule(path)
    except AttributeError:
        return False
    own = set(owner._parameters) | {n for n, b in owner._buffers.items() if b is not None}
    return type(owner) is nn.Module and not owner._modules and own <= names


def _layer_module(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, list[fx.Node]] | None:
    """The nn module computing ``node`` with its parameters, and the graph inputs it replaces."""
    weight = _attr(gm, _arg(node, 1, "weight", None))
    bias_node = _arg(node, 2, "bias", None)
    bias = _attr(gm, bias_node)
    if not isinstance(weight, nn.Parameter) or (bias_node is not None and not isinstance(bias, nn.Parameter)):
        return None
    if node.target is aten.linear.default:
        module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        conv_type = CONV_OPS[node.target]
        dims = weight.dim() - 2
        groups = int(_arg(node, 6, "groups", 1))
        module = conv_type(
            weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
            stride=tuple(_arg(node, 3, "stride", [1] * dims)),
            padding=_padding(_arg(node, 4, "padding", [0] * dims)),
            dilation=tuple(_arg(node, 5, "dilation", [1] * dims)),
            groups=groups, bias=bias is not None, device="meta",
        )
    module.weight = weight
    if bias is not None:
        module.bias = bias
    return module, [node.args[1]] + ([bias_node] if bias_node is not None else [])


def _padding(value: Any) -> Any:
    return value if isinstance(value, str) else tuple(value)


def _bn_module(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, list[fx.Node]] | None:
    args = [_arg(node, i, n, None) for i, n in enumerate(("input", "weight", "bias", "running_mean", "running_var"))]
    if _arg(node, 5, "training", True) is not False or args[3] is None:
        return None
    value = args[0].meta.get("val") if isinstance(args[0], fx.Node) else None
    bn_type = _BN_OF_RANK.get(value.dim()) if isinstance(value, torch.Tensor) else None
    tensors = [_attr(gm, a) for a in args[1:]]
    if bn_type is None or any(t is None for t, a in zip(tensors, args[1:]) if a is not None):
        return None
    weight, bias, mean, var = tensors
    module = bn_type(mean.shape[0], eps=float(_arg(node, 7, "eps", 1e-5)), affine=weight is not None, device="meta")
    module.eval()
    if weight is not None:
        module.weight, module.bias = weight, bias
    module.running_mean, module.running_var = mean, var
    owner = gm.get_submodule(args[3].target.rpartition(".")[0])
    module.num_batches_tracked = owner._buffers.get("num_batches_tracked")
    return module, [a for a in args[1:] if a is not None]


def layers_to_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """Conv / linear / eval batch-norm aten calls with parameter arguments as ``call_module``s
    of real modules at the parameters' module path (in place; returns ``gm``)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in CONV_OPS or node.target is aten.linear.default:
            built = _layer_module(gm, node)
        elif node.target is aten.batch_norm.default:
            built = _bn_module(gm, node)
        else:
            built = None
        if built is None:
            continue
        module, replaced = built
        path = _owner_path(replaced[0].target)
        names = {n.target.rpartition(".")[2] for n in replaced} | {"num_batches_tracked"}
        if not _replaceable(gm, path, names) or any(len(n.users) > 1 for n in replaced):
            path = _free_name(gm, f"{path}.{replaced[0].target.rpartition('.')[2]}_layer".lstrip("."))
        call_module_instead(gm, node, path, module)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)  # e.g. the batch norms' num_batches_tracked, read by nothing
    gm.graph.lint()
    gm.recompile()
    return gm


def _free_name(gm: fx.GraphModule, path: str) -> str:
    candidate, index = path, 1
    while True:
        try:
            gm.get_submodule(candidate)
        except AttributeError:
            return candidate
        candidate, index = f"{path}_{index}", index + 1


def modules_to_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """The inverse of :func:`layers_to_modules` for conv and linear modules (in place): each
    call becomes ``get_attr`` weight and bias and the aten op, with the call's metadata."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if type(module) not in (nn.Linear, *_CONV_OP_OF):
            continue
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            weight.meta["val"] = node.meta.get("val")
            bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            if isinstance(module, nn.Linear):
                call = gm.graph.call_function(aten.linear.default, (node.args[0], weight, bias))
            else:
                op = _CONV_OP_OF[type(module)]
                op = op.padding if isinstance(module.padding, str) else op.default
                call = gm.graph.call_function(
                    op,
                    (node.args[0], weight, bias, list(module.stride), _list(module.padding),
                     list(module.dilation), module.groups),
                )
        weight.meta["val"] = _fake_like(node, module.weight)
        if bias is not None:
            bias.meta["val"] = _fake_like(node, module.bias)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _list(value: Any) -> Any:
    return value if isinstance(value, str) else list(value)


def _fake_like(node: fx.Node, tensor: torch.Tensor) -> Any:
    """A fake tensor of ``tensor``'s shape in the fake mode of ``node``'s value (torchao reads
    shapes and dtypes from ``meta['val']``)."""
    value = node.meta.get("val")
    mode = getattr(value, "fake_mode", None)
    if mode is None:
        return tensor.detach()
    with mode:
        return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
