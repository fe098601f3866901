"""Users' own models and recipes, registered from ``conftest.py``.

    # conftest.py
    def pytest_easyquant_register(registry):
        registry.add_model("tinynet", build_tinynet)          # callable(seed) -> nn.Module | ZooModel
        registry.add_recipe(my_recipe)                        # an eqcore.quant.recipes.Recipe

Then ``pytest --eq-model tinynet --eq-recipe my-recipe`` runs the generated suite on them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class Registry:
    """Models and recipes known to this session, beyond eqcore's built-in ones."""

    models: dict[str, Callable[..., Any]] = field(default_factory=dict)
    specs: dict[str, Any] = field(default_factory=dict)
    recipes: dict[str, Any] = field(default_factory=dict)

    def add_model(self, name: str, factory: Callable[..., Any], *, spec: Any = None) -> None:
        """Register ``factory`` (called with ``seed=`` if it accepts it) under ``name``.

        ``spec`` (an ``eqcore.models.specs.InputSpec``) describes the input; default: ImageNet 3x224x224.
        """
        if not callable(factory):
            raise TypeError(f"registry.add_model({name!r}, ...): the factory must be callable")
        self.models[name] = factory
        if spec is not None:
            self.specs[name] = spec

    def add_recipe(self, recipe: Any) -> None:
        """Register an ``eqcore.quant.recipes.Recipe`` under its own name."""
        from eqcore.quant.recipes import Recipe

        if not isinstance(recipe, Recipe):
            raise TypeError(f"registry.add_recipe needs an eqcore.quant.recipes.Recipe, got {type(recipe).__name__}")
        self.recipes[recipe.name] = recipe

    def recipe(self, name: str) -> Any:
        from eqcore.quant.recipes import get_recipe

        return self.recipes.get(name) or get_recipe(name)

    def make_model(self, name: str, weights: str, *, seed: int) -> Any:
        """A ZooModel for ``name``: a registered factory, or eqcore's zoo."""
        import torch

        from eqcore.models.specs import imagenet_spec
        from eqcore.errors import EQError
        from eqcore.models.weights import load_weights_file
        from eqcore.models.zoo import ZooModel, get_model

        factory = self.models.get(name)
        if factory is None:
            return get_model(name, weights, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            accepts_seed = "seed" in inspect.signature(factory).parameters
            built = factory(seed=seed) if accepts_seed else factory()
        if not isinstance(built, ZooModel):
            if not isinstance(built, torch.nn.Module):
                raise EQError(f"registered model {name!r} returned {type(built).__name__}, not an nn.Module")
            built = ZooModel(model=built, name=name, weights="none", spec=self.specs.get(name) or imagenet_spec())
        if weights != "none":
            # eqcore's loader: a file that does not fit gets one line naming the keys, not torch's report.
            load_weights_file(built.model, weights, model_name=name)
            built.weights = weights
        built.model.eval()
        return built


class RegistryHooks:
    """Hook specification: ``pytest_easyquant_register(registry)``."""

    @pytest.hookspec
    def pytest_easyquant_register(self, registry: Registry) -> None:
        """Register models and recipes for the generated suites and fixtures."""
