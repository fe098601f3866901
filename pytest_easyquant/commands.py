"""The commands the plugin prints, built so that they work as printed.

A command that records or repairs baselines carries what selects the model run and its baseline
directory (``--eq-model``, weights, data, the recipe whose baselines they are, the run's other
non-default settings, ``--eq-baseline-dir``, the ``--eq-no-*`` switches that were on), the
invocation's own paths and ``-p``/``-c``/``--rootdir``/``-o`` options, and ``-m easyquant`` so it
runs the generated checks only.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import pytest

from pytest_easyquant.options import BY_DEST, OPTIONS, EQConfig

# RunRequest fields that change results without naming the baseline directory.
_SETTINGS = ("device", "seed", "calib_batches", "batch_size", "sa_batches")
_CARRIED_PAIRS = ("-p", "-c", "--config-file", "--rootdir", "-o", "--override-ini")


def _carried_options(args: list[str]) -> list[str]:
    """The invocation's ``-p``, ``-c``, ``--rootdir`` and ``-o`` options, in both spellings."""
    carried: list[str] = []
    tokens = iter(args)
    for token in tokens:
        if token in _CARRIED_PAIRS:
            following = next(tokens, None)
            if following is not None:
                carried += [token, following]
        elif any(token.startswith(f"{flag}=") for flag in _CARRIED_PAIRS if flag.startswith("--")):
            carried.append(token)
        elif len(token) > 2 and token[:2] in ("-p", "-c", "-o") and not token.startswith("--"):
            carried.append(token)
    return carried


def _positional_args(config: pytest.Config) -> list[str]:
    """The paths or node ids the user named (not ``testpaths``, not the invocation directory)."""
    if getattr(config, "args_source", None) == pytest.Config.ArgsSource.ARGS:
        return [str(a) for a in config.args]
    return []


def _ini_sets(config: pytest.Config, dest: str) -> bool:
    try:
        value = config.getini(BY_DEST[dest].ini)
    except (ValueError, KeyError):
        return False
    return value not in (None, "", [], False)


def _settings(config: pytest.Config, options: EQConfig, run: Any, recipe: str) -> list[str]:
    """Weights, data, recipe, CLE, the run's other settings and the baseline directory, each where
    it is not the built-in default or the ini file sets it (so the command line overrides it)."""
    args: list[str] = []
    if run.weights != BY_DEST["weights"].default or _ini_sets(config, "weights"):
        args += ["--eq-weights", run.weights]
    if run.data is not None:
        args += ["--eq-data", run.data]
    args += ["--eq-recipe", recipe]
    if run.cle:
        args.append("--eq-cle")
    for name in _SETTINGS:
        value = getattr(run, name)
        if value != BY_DEST[name].default or _ini_sets(config, name):
            args += [BY_DEST[name].flag, str(value)]
    default_dir = (Path(config.rootpath) / BY_DEST["baseline_dir"].default).resolve()
    if options.baseline_dir != default_dir or _ini_sets(config, "baseline_dir"):
        args.append(f"--eq-baseline-dir={options.baseline_dir}")
    # Switches that turn checks off (--eq-no-plots, ...): the command records what the run checks.
    args += [o.flag for o in OPTIONS if o.kind == "bool" and o.dest.startswith("no_") and getattr(options, o.dest, False)]
    return args


def run_selection(config: pytest.Config, options: EQConfig, request: Any) -> list[str]:
    """The options that select ``request``'s model run and the baselines it is compared with.

    The recipe is the one whose baselines these are (``--eq-baseline-recipe``'s, when given), so
    a repair re-records that recipe's files with that recipe.
    """
    return ["--eq-model", request.model, *_settings(config, options, request, options.baseline_recipe or request.recipe)]


def _join(config: pytest.Config, args: list[str]) -> str:
    carried = _carried_options(list(config.invocation_params.args))
    return shlex.join(["pytest", *carried, *args])


def record_missing_command(config: pytest.Config, options: EQConfig, request: Any) -> str:
    """Records every missing baseline of one model run and leaves the existing ones alone."""
    selection = [*_positional_args(config), "-m", "easyquant", *run_selection(config, options, request)]
    return _join(config, [*selection, "--eq-update-new-only"])


def rerecord_check_command(config: pytest.Config, options: EQConfig, request: Any, check: str) -> str:
    """Re-records the baselines of one generated check (``check`` is its name, e.g. ``fidelity``)."""
    selection = [*_positional_args(config), "-m", "easyquant", "-k", check, *run_selection(config, options, request)]
    return _join(config, [*selection, "--eq-update-baselines"])


def node_arg(node: pytest.Item) -> str:
    """``node`` as a command-line argument from the invocation directory: ``path::name``."""
    path = Path(str(node.path))
    try:
        where = os.path.relpath(path, node.config.invocation_params.dir)
    except ValueError:  # another drive on Windows
        where = str(path)
    return "::".join([Path(where).as_posix(), *node.nodeid.split("::")[1:]])


def user_test_command(node: pytest.Item, options: EQConfig, *, update: str) -> str:
    """Runs one of the user's own tests (whose ``eq_baseline`` check needs recording) with
    ``update`` (``--eq-update-new-only`` or ``--eq-update-baselines``) and the session's options."""
    args = [node_arg(node)]
    for model in options.models:
        args += ["--eq-model", model]
    args += _settings(node.config, options, options, options.recipe)
    return _join(node.config, [*args, update])
