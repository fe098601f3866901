"""eqcore's PT2E annotation rules: which tensors of an exported aten graph a recipe quantizes.

:class:`EQQuantizer` is a torchao ``Quantizer`` (not one of torchao's stock backend quantizers,
which do not handle every model we guard). It marks, in graph order:

- the weight of every conv / linear op whose layer type the recipe quantizes (per channel on
  axis 0 or per tensor, as the recipe says), when the weight is a parameter;
- the activations a backend would hold in integers: the inputs and outputs of those layers and
  of the ops that requantize (add, mul, matmul, bmm, cat, scaled-dot-product attention). An
  output followed only by a ReLU/ReLU6 is quantized after the activation, as a fused backend
  op would; a tensor that already sits on a grid (quantized upstream, then only reshaped,
  sliced or max-pooled) is not quantized again; an unquantized input is quantized at its
  producer's output, so every consumer shares one quantizer.

Every spec builds eqcore's fake quantizers (``eqcore.quant.pt2e_modules``), so both backends run
the same quantizer math.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from eqcore._torchao import QuantizationAnnotation, QuantizationSpec, Quantizer
from eqcore.errors import EQError
from eqcore.prepare.export_graph import CONV_OPS
from eqcore.quant.pt2e_modules import pt2e_variant
from eqcore.quant.recipes import QuantizerSpec, Recipe

__all__ = ["ANNOTATION_KEY", "EQQuantizer", "WEIGHTED_OPS"]

aten = torch.ops.aten
ANNOTATION_KEY = "quantization_annotation"

# aten op -> the layer type a recipe names for it (``Recipe.layer_types``).
WEIGHTED_OPS: dict[Any, type[nn.Module]] = {**CONV_OPS, aten.linear.default: nn.Linear}

# Ops a backend runs on integers and requantizes: their tensor inputs (how many) and output.
REQUANTIZING_OPS: dict[Any, int] = {
    aten.add.Tensor: 2,
    aten.add_.Tensor: 2,
    aten.mul.Tensor: 2,
    aten.mul_.Tensor: 2,
    aten.matmul.default: 2,
    aten.bmm.default: 2,
    aten.mm.default: 2,
    aten.scaled_dot_product_attention.default: 3,
}
CONCAT_OPS = (aten.cat.default, aten.concat.default)

# A quantized op's output goes through these first when they are its only user (fused backends).
FUSED_ACTIVATIONS = (
    aten.relu.default,
    aten.relu_.default,
    aten.hardtanh.default,
    aten.hardtanh_.default,
)

# Identities in eval mode.
IDENTITIES = (aten.dropout.default, aten.clone.default, aten.contiguous.default)

# Ops whose output values are input values: a quantized input stays on its grid.
GRID_PRESERVING = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.t.default, aten.flatten.using_ints, aten.contiguous.default,
    aten.clone.default, aten.dropout.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
    aten.adaptive_max_pool2d.default, aten.pixel_shuffle.default, operator.getitem,
}


def _spec(quantizer: QuantizerSpec, channels: int | None = None) -> QuantizationSpec:
    qmin, qmax = quantizer.quant_range
    return QuantizationSpec(
        dtype=quantizer.dtype,
        observer_or_fake_quant_ctr=pt2e_variant(quantizer.factory(channels)),
        quant_min=qmin,
        quant_max=qmax,
        qscheme=quantizer.qscheme,
        ch_axis=quantizer.ch_axis if quantizer.per_channel else None,
    )


def _is_float_tensor(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _annotation(node: fx.Node) -> QuantizationAnnotation:
    annotation = node.meta.get(ANNOTATION_KEY)
    if annotation is None:
        annotation = node.meta[ANNOTATION_KEY] = QuantizationAnnotation(_annotated=True)
    return annotation


def weight_node(node: fx.Node) -> fx.Node | None:
    """The ``get_attr`` weight of a conv / linear node, or None when the weight is computed."""
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    return weight if isinstance(weight, fx.Node) and weight.op == "get_attr" else None


class EQQuantizer(Quantizer):
    """Annotates an exported graph with a recipe's quantizers (see the module docstring)."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        self.activation = _spec(recipe.activation)
        self._layers: set[str] = set()  # the module paths of the layers annotated

    def _is_quantized(self, node: fx.Node) -> bool:
        """True when ``node``'s value is already on a quantization grid."""
        while node.op == "call_function" and node.target in GRID_PRESERVING and node.args:
            node = node.args[0]
            if not isinstance(node, fx.Node):
                return False
        annotation = node.meta.get(ANNOTATION_KEY)
        return annotation is not None and annotation.output_qspec is not None

    def _quantize_input(self, consumer: fx.Node, value: Any, spec: QuantizationSpec | None = None) -> None:
        spec = spec or self.activation
        if not _is_float_tensor(value) or self._is_quantized(value):
            return
        while value.op == "call_function" and value.target in IDENTITIES and _is_float_tensor(value.args[0]):
            value = value.args[0]  # quantize (and name) the tensor itself, not its eval-mode copy
        if value.op in ("placeholder", "call_function"):
            _annotation(value).output_qspec = spec
        else:
            _annotation(consumer).input_qspec_map[value] = spec

    def _quantize_output(self, node: fx.Node, spec: QuantizationSpec | None = None) -> None:
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target in FUSED_ACTIVATIONS:
            node = users[0]
        if _is_float_tensor(node):
            _annotation(node).output_qspec = spec or self.activation

    def _annotate_layer(self, node: fx.Node) -> None:
        weight = weight_node(node)
        if weight is None or WEIGHTED_OPS[node.target] not in self.recipe.layer_types:
            return
        layer = str(weight.target).removesuffix(".weight")  # the layer's module path
        self._layers.add(layer)
        recipe = self.recipe.for_layer(layer)  # a MixedRecipe's high layers get its high recipe
        activation = self.activation if recipe is self.recipe else _spec(recipe.activation)
        self._quantize_input(node, node.args[0], activation)
        channels = int(weight.meta["val"].shape[0]) if "val" in weight.meta else None
        _annotation(node).input_qspec_map[weight] = _spec(recipe.weight, channels)
        self._quantize_output(node, activation)

    def _annotate_requantizing(self, node: fx.Node, inputs: list[Any]) -> None:
        tensors = [value for value in inputs if _is_float_tensor(value)]
        if len(tensors) < 2 and node.target not in CONCAT_OPS:
            return  # an op with a constant is folded into its neighbours by a backend
        for value in tensors:
            self._quantize_input(node, value)
        self._quantize_output(node)

    def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
        self._layers = set()
        for node in model.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in WEIGHTED_OPS:
                self._annotate_layer(node)
            elif node.target in REQUANTIZING_OPS:
                self._annotate_requantizing(node, list(node.args[: REQUANTIZING_OPS[node.target]]))
            elif node.target in CONCAT_OPS and node.args and isinstance(node.args[0], (list, tuple)):
                self._annotate_requantizing(node, list(node.args[0]))
        unknown = [name for name in getattr(self.recipe, "high_layers", ()) if name not in self._layers]
        if unknown:
            raise EQError(
                f"mixed recipe {self.recipe.name!r}: {unknown} are not quantizable layers of the exported "
                f"model; its layers are {sorted(self._layers)[:12]}"
            )
        return model

    def validate(self, model: fx.GraphModule) -> None:
        """Every annotation here is built by this class; nothing to check."""
