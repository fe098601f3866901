"""Users' own models and recipes, registered from ``conftest.py``.

    # conftest.py
    def pytest_easyquant_register(registry):
        registry.add_model("tinynet", build_tinynet)          # callable(seed) -> nn.Module | ZooModel
        registry.add_recipe(my_recipe)                        # an eqcore.quant.recipes.Recipe
        registry.add_data("my-texts", load_my_texts)          # callable(spec) -> (calib, eval)

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
    data: dict[str, Callable[..., Any]] = field(default_factory=dict)

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

    def add_data(self, name: str, factory: Callable[..., Any]) -> None:
        """Register data ``name`` (for ``--eq-data name``), e.g. your own tokenized text.

        ``factory(spec)`` (or ``factory()``) returns ``(calib, eval)``: each a tensor of model
        inputs (token ids padded with ``spec.pad_id`` for ``hf:`` text models) or an
        ``(inputs, labels)`` pair of tensors.
        """
        if not callable(factory):
            raise TypeError(f"registry.add_data({name!r}, ...): the factory must be callable")
        self.data[name] = factory

    def loaders(self, data: str, spec: Any, *, batch_size: int, calib_batches: int, seed: int, model_name: str) -> Any:
        """Registered data by name, else eqcore's built-in data (``get_loaders``)."""
        from eqcore.models.loaders import get_loaders, tensor_loaders

        factory = self.data.get(data)
        if factory is None:
            return get_loaders(
                data, spec, batch_size=batch_size, calib_batches=calib_batches, seed=seed, model_name=model_name
            )
        built = factory(spec) if inspect.signature(factory).parameters else factory()
        if not isinstance(built, (tuple, list)) or len(built) != 2:
            from eqcore.errors import EQError

            raise EQError(f"registered data {data!r} must return (calib, eval), got {type(built).__name__}")
        return tensor_loaders(data, built[0], built[1], batch_size=batch_size)

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
