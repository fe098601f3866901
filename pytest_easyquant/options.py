"""The plugin's options: one table, registered as CLI flags and ini keys, resolved into a dataclass.

Precedence for every option: marker > CLI > ini > default. Markers apply to a single test (see
``plugin.py``); this module handles CLI, ini and defaults, and validates values so that a bad one
is a ``pytest.UsageError`` naming the option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_easyquant.tolerances import ToleranceRule, parse_rule


@dataclass(frozen=True)
class Option:
    """One option: its dest name, CLI flag, ini key, default and help."""

    dest: str
    help: str
    default: Any = None
    kind: str = "str"  # str | int | bool | list
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--eq-" + self.dest.replace("_", "-")

    @property
    def ini(self) -> str:
        return "eq_" + self.dest


OPTIONS: tuple[Option, ...] = (
    Option("model", "add a generated regression suite for this model (repeatable): a torchvision "
           "classification model name, 'digits', 'timm:<name>', 'hf:<bert-tiny|vit-tiny|config.json>', "
           "or 'package.module:callable'", [], "list", "NAME"),
    Option("weights", "model weights: 'none' (seeded init), 'DEFAULT', a torchvision weights enum name, "
           "or a local state-dict file", "none", metavar="WEIGHTS"),
    Option("data", "data: 'samples' (built-in images), 'digits', 'tokens' (token ids for text models), "
           "an ImageFolder directory, or registered data; default: the model's own", None, metavar="DATA"),
    Option("recipe", "quantization recipe (w8a8, w8a8-pertensor, w4a8, w4a4, w8a8-mse, or a registered one)",
           "w8a8", metavar="RECIPE"),
    Option("baseline_recipe", "compare against the baselines recorded for this recipe instead of "
           "--eq-recipe's own (e.g. to see what moves from w8a8 to w4a4)", None, metavar="RECIPE"),
    Option("cle", "apply cross-layer equalization before quantizing", False, "bool"),
    Option("backend", "preparation backend: 'fx' (torch.fx + torch.ao), 'pt2e' (torch.export + torchao), "
           "or 'auto' (FX when the model traces, else PT2E)", "auto", metavar="BACKEND"),
    Option("device", "device to run on: cpu, cuda or cuda:N", "cpu", metavar="DEVICE"),
    Option("seed", "seed for model init, calibration crops and sampling", 0, "int", "N"),
    Option("calib_batches", "calibration batches", 4, "int", "N"),
    Option("batch_size", "batch size for calibration, evaluation and the SA pass", 8, "int", "N"),
    Option("sa_batches", "batches for the sensitivity-analysis pass", 1, "int", "N"),
    Option("baseline_dir", "directory holding the baselines (relative to the rootdir)", "baselines", metavar="DIR"),
    Option("results_dir", "directory for failure images and the HTML report (relative to the rootdir)",
           ".eq-results", metavar="DIR"),
    Option("update_baselines", "write the obtained values as the new baselines (checks pass)", False, "bool"),
    Option("update_new_only", "write baselines only where none exists yet; compare the rest", False, "bool"),
    Option("no_plots", "skip rendering and comparing plots", False, "bool"),
    Option("pin_kernels", "run torch's CPU kernels as on any x86-64 CPU with AVX2 (ATen, oneDNN, MKL), so "
           "baselines recorded on one machine compare on another", False, "bool"),
    Option("allow_degenerate", "record and compare a model whose outputs are degenerate (constant, all "
           "zero or non-finite logits) instead of failing its checks", False, "bool"),
    Option("tolerance", "tolerance rule '<metric-glob> atol=<x> [rtol=<y>]' (repeatable), "
           "e.g. 'fidelity.sqnr_db atol=0.5'", [], "list", "RULE"),
    Option("json", "write a JSON summary of the session's checks to this file (relative to the "
           "current directory; an ini value, to the rootdir)", None, metavar="PATH"),
    Option("prune_unused", "delete the baselines no check of this session uses (respecting -k/-m)", False, "bool"),
    Option("fail_unused", "fail the session when baselines no check uses exist", False, "bool"),
    Option("no_sensitivity", "skip the per-layer sensitivity check (its sweep and bar plot)", False, "bool"),
    Option("mixed_precision", "suggest which layers to keep at HIGH with the rest at LOW, measured, in the "
           "summary and report: LOW:HIGH recipes, e.g. w4a8:w8a8; target SQNR within 1 dB of all-HIGH, "
           "or append :sqnr=<dB> or :top1=<share>", None, metavar="LOW:HIGH"),
)
BY_DEST = {option.dest: option for option in OPTIONS}


def register(parser: pytest.Parser) -> None:
    """Add every option as a CLI flag and an ini key."""
    group = parser.getgroup("easyquant", "quantization regression suites (pytest-easyquant)")
    for option in OPTIONS:
        kwargs: dict[str, Any] = {"dest": "eq_" + option.dest, "help": option.help}
        if option.kind == "bool":
            kwargs["action"] = "store_true"
            kwargs["default"] = None
        elif option.kind == "list":
            kwargs["action"] = "append"
            kwargs["metavar"] = option.metavar
        else:
            kwargs["metavar"] = option.metavar
        group.addoption(option.flag, **kwargs)
        ini_type = {"bool": "bool", "list": "linelist"}.get(option.kind, "string")
        parser.addini(option.ini, help=option.help, type=ini_type, default=_ini_default(option))


def _ini_default(option: Option) -> Any:
    if option.kind == "list":
        return []
    if option.kind == "bool":
        return False
    return None


def _raw(config: pytest.Config, option: Option) -> tuple[Any, str]:
    cli = config.getoption("eq_" + option.dest)
    if cli not in (None, []):
        return cli, option.flag
    ini = config.getini(option.ini)
    if ini not in (None, [], "") and not (option.kind == "bool" and ini is False):
        return ini, f"ini option {option.ini}"
    return option.default, option.flag


def _convert(option: Option, value: Any, where: str) -> Any:
    if option.kind == "int":
        try:
            number = int(str(value).strip())
        except ValueError:
            raise pytest.UsageError(f"{where} expects an integer, got {value!r}") from None
        if number < 0 or (option.dest in ("calib_batches", "batch_size", "sa_batches") and number < 1):
            raise pytest.UsageError(f"{where} must be a positive integer, got {value!r}")
        return number
    if option.kind == "bool":
        return bool(value)
    if option.kind == "list":
        return [str(v) for v in value]
    return str(value) if value is not None else None


@dataclass(frozen=True)
class EQConfig:
    """Resolved session-wide options (CLI > ini > default), validated."""

    models: tuple[str, ...]
    weights: str
    data: str | None
    recipe: str
    baseline_recipe: str | None
    cle: bool
    backend: str
    device: str
    seed: int
    calib_batches: int
    batch_size: int
    sa_batches: int
    baseline_dir: Path
    results_dir: Path
    update_baselines: bool
    update_new_only: bool
    no_plots: bool
    pin_kernels: bool = False
    allow_degenerate: bool = False
    cli_rules: tuple[ToleranceRule, ...] = field(default=())
    ini_rules: tuple[ToleranceRule, ...] = field(default=())
    source: dict[str, str] = field(default_factory=dict, compare=False)
    json: Path | None = None
    prune_unused: bool = False
    fail_unused: bool = False
    no_sensitivity: bool = False
    mixed_precision: str | None = None

    @property
    def writes_baselines(self) -> bool:
        return self.update_baselines or self.update_new_only


def _rules(values: list[str], *, source: str, where: str) -> tuple[ToleranceRule, ...]:
    rules = []
    for text in values:
        try:
            rules.append(parse_rule(text, source=source))
        except ValueError as exc:
            raise pytest.UsageError(f"{where}: {exc}") from None
    return tuple(rules)


def check_device(device: str, where: str) -> str:
    import torch

    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"{where} {device}: CUDA is not available on this machine; use --eq-device cpu")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise pytest.UsageError(
                f"{where} {device}: no such GPU (this machine has {torch.cuda.device_count()})"
            )
        return device
    raise pytest.UsageError(f"{where} expects cpu, cuda or cuda:N, got {device!r}")


BACKENDS = ("auto", "fx", "pt2e")


def check_backend(backend: str, where: str) -> str:
    if backend not in BACKENDS:
        raise pytest.UsageError(f"{where} expects one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def resolve(config: pytest.Config) -> EQConfig:
    """Read every option (CLI > ini > default) and validate it."""
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for option in OPTIONS:
        raw, where = _raw(config, option)
        values[option.dest] = _convert(option, raw, where)
        source[option.dest] = where
    root = Path(config.rootpath)
    cli_tolerances = config.getoption("eq_tolerance") or []
    ini_tolerances = config.getini("eq_tolerance") or []
    if values["update_baselines"] and values["update_new_only"]:
        raise pytest.UsageError("--eq-update-baselines and --eq-update-new-only are exclusive: pick one")
    _check_mixed_precision(values["mixed_precision"], values["no_sensitivity"], source["mixed_precision"])
    return EQConfig(
        models=tuple(dict.fromkeys(values["model"])),
        weights=values["weights"],
        data=values["data"],
        recipe=values["recipe"],
        baseline_recipe=values["baseline_recipe"],
        cle=values["cle"],
        backend=check_backend(values["backend"], source["backend"]),
        device=check_device(values["device"], source["device"]),
        seed=values["seed"],
        calib_batches=values["calib_batches"],
        batch_size=values["batch_size"],
        sa_batches=values["sa_batches"],
        baseline_dir=(root / values["baseline_dir"]).resolve(),
        results_dir=(root / values["results_dir"]).resolve(),
        update_baselines=values["update_baselines"],
        update_new_only=values["update_new_only"],
        no_plots=values["no_plots"],
        pin_kernels=_pin_kernels(values["pin_kernels"], source["pin_kernels"]),
        allow_degenerate=values["allow_degenerate"],
        cli_rules=_rules(cli_tolerances, source="cli", where="--eq-tolerance"),
        ini_rules=_rules(ini_tolerances, source="ini", where="ini option eq_tolerance"),
        source=source,
        json=_json_path(config, values["json"], source["json"]),
        prune_unused=values["prune_unused"],
        fail_unused=values["fail_unused"],
        no_sensitivity=values["no_sensitivity"],
        mixed_precision=values["mixed_precision"],
    )


def _pin_kernels(value: bool, where: str) -> bool:
    """Pin the CPU kernels now, before any model runs (``cpu_kernels.pin``)."""
    if value:
        from pytest_easyquant import cpu_kernels

        try:
            cpu_kernels.pin(where)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
    return value


def _json_path(config: pytest.Config, value: str | None, where: str) -> Path | None:
    """``--eq-json`` relative to the invocation directory (as ``--junitxml``), ``eq_json`` to the rootdir."""
    if not value:
        return None
    base = Path(config.rootpath) if where.startswith("ini") else Path(config.invocation_params.dir)
    path = (base / value).resolve()
    if path.is_dir():
        raise pytest.UsageError(f"{where} {value}: is a directory; name the JSON file to write, e.g. {value}/easyquant.json")
    return path


def _check_mixed_precision(value: str | None, no_sensitivity: bool, where: str) -> None:
    from pytest_easyquant.sensitivity import parse_mixed_precision

    if value is None:
        return
    try:
        parse_mixed_precision(value)
    except ValueError as exc:
        raise pytest.UsageError(f"{where} {exc}") from None
    if no_sensitivity:
        raise pytest.UsageError(f"{where} ranks layers with the sensitivity check: drop --eq-no-sensitivity")


def documentation_rows() -> list[tuple[str, str, str, str]]:
    """(kwarg, CLI, ini, default) for every option: the README's reference table."""
    rows = []
    for option in OPTIONS:
        default = option.default
        shown = "—" if default in (None, [], False) else repr(default) if not isinstance(default, str) else default
        rows.append((option.dest, option.flag, option.ini, shown))
    return rows

