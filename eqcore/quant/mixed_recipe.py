"""A mixed-precision recipe: a base (low) recipe with some layers kept at another (high) one.

:class:`MixedRecipe` is a :class:`~eqcore.quant.recipes.Recipe`, so ``prepare`` and every
backend accept it; ``for_layer(name)`` says which recipe a layer gets. A layer at the high
recipe gets its weight quantizer and the quantizer of its output from it, matching what
per-layer sensitivity toggles as one layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from eqcore._torch_ao import QConfigMapping
from eqcore.errors import EQError
from eqcore.quant.recipes import Recipe, get_recipe

__all__ = ["MixedRecipe", "mixed_recipe"]


@dataclass(frozen=True)
class MixedRecipe(Recipe):
    """``weight`` / ``activation`` are the low recipe's; ``high_layers`` use ``high``."""

    high: Recipe | None = None
    high_layers: tuple[str, ...] = ()

    def for_layer(self, name: str) -> Recipe:
        if self.high is not None and name in self.high_layers:
            return self.high
        return self

    def qconfig_mapping(self, model: nn.Module) -> QConfigMapping:
        """The mapping of the base recipe with ``high_layers`` at the high one; EQError on an unknown layer."""
        layers = {name for name, module in model.named_modules() if isinstance(module, self.layer_types)}
        unknown = [name for name in self.high_layers if name not in layers]
        if unknown:
            raise EQError(
                f"mixed recipe {self.name!r}: {unknown} are not quantizable layers of "
                f"{type(model).__name__}; its layers are {sorted(layers)[:12]}"
            )
        return super().qconfig_mapping(model)

    def to_dict(self) -> dict[str, Any]:
        data = Recipe(
            name=self.name, weight=self.weight, activation=self.activation, description=self.description
        ).to_dict()
        data["high"] = self.high.to_dict() if self.high is not None else None
        data["high_layers"] = list(self.high_layers)
        return data


def mixed_recipe(low: str | Recipe, high: str | Recipe, layers: Iterable[str]) -> MixedRecipe:
    """``low`` everywhere except ``layers`` (module names), which get ``high``."""
    low, high = get_recipe(low), get_recipe(high)
    layers = tuple(layers)
    return MixedRecipe(
        name=f"{low.name}+{high.name}[{len(layers)}]",
        weight=low.weight,
        activation=low.activation,
        description=f"{low.name} with {len(layers)} layers at {high.name}: {', '.join(layers) or 'none'}",
        layer_types=low.layer_types,
        high=high,
        high_layers=layers,
    )
