"""The passes of a per-layer sensitivity sweep over one loader, with their measurements.

Per batch: a float pass (every quantizer off) that records each layer's output, an all-on pass
(cumulative error at each layer), weights-only and activations-only passes, then per layer an
isolated pass (only its quantizers on; its output there is the local error, since its inputs
are float) and a leave-one-out pass (all but its quantizers on). On a GraphModule the per-layer
passes re-run only what the toggle changes (:class:`~eqcore.analysis.replay.GraphReplay`).
Logits are kept as ``collect_logits`` keeps them (float32, CPU), so every SQNR is the one a user
gets from toggling the same quantizers by hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from eqcore.analysis.evaluate import _batch_parts, _output_tensor
from eqcore.analysis.layers import QuantizedLayer
from eqcore.analysis.replay import GraphReplay, set_fake_quant

__all__ = ["SweepResult", "run_sweep"]


@dataclass
class _ErrorSums:
    """Signal and noise energy summed over calls, in float64."""

    signal: float = 0.0
    noise: float = 0.0

    def add(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        ref = reference.detach().to(dtype=torch.float64)
        self.signal += ref.square().sum().item()
        self.noise += (ref - test.detach().to(device=ref.device, dtype=torch.float64)).square().sum().item()


@dataclass
class SweepResult:
    """Logits per configuration (concatenated over batches) and error sums per layer output."""

    float_logits: list[torch.Tensor] = field(default_factory=list)
    config_logits: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    isolated: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    leave_one_out: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    local: dict[str, _ErrorSums] = field(default_factory=dict)
    cumulative: dict[str, _ErrorSums] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0


def _logits(output: Any) -> torch.Tensor:
    return _output_tensor(output).detach().float().cpu()


@contextlib.contextmanager
def _probing(modules: dict[str, nn.Module], on_output: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``on_output(name, output)`` after every forward of the named modules."""

    def hook(name: str) -> Any:
        def record(_module: nn.Module, _args: Any, output: Any) -> None:
            on_output(name, _output_tensor(output))

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Comparer:
    """Adds each probe call's output to a layer's error sums against the float pass's outputs."""

    def __init__(self, references: dict[str, list[torch.Tensor]], sums: dict[str, _ErrorSums]) -> None:
        self.references, self.sums = references, sums
        self.calls = dict.fromkeys(references, 0)

    def __call__(self, probe: str, output: torch.Tensor) -> None:
        index = self.calls[probe]
        self.calls[probe] = index + 1
        if index < len(self.references[probe]):
            self.sums[probe].add(self.references[probe][index], output)


class _Sweep:
    def __init__(self, model: nn.Module, quantizers: dict[str, nn.Module], layers: list[QuantizedLayer],
                 weights: set[str], leave_one_out: bool, replay: bool) -> None:
        self.model, self.quantizers, self.layers = model, quantizers, layers
        self.weights = weights
        self.activations = set(quantizers) - weights
        self.leave_one_out = leave_one_out
        self.probes = {layer.probe: model.get_submodule(layer.probe) for layer in layers if layer.probe}
        graph = GraphReplay(model, quantizers) if replay and isinstance(model, fx.GraphModule) else None
        self.replay = graph if graph is not None and graph.usable else None
        self.result = SweepResult(
            config_logits={"all": [], "weights_only": [], "activations_only": []},
            isolated={layer.name: [] for layer in layers},
            leave_one_out={layer.name: [] for layer in layers} if leave_one_out else {},
            local={layer.probe: _ErrorSums() for layer in layers if layer.probe},
            cumulative={layer.probe: _ErrorSums() for layer in layers if layer.probe},
        )

    def _full(self, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, dict[fx.Node, Any] | None]:
        if self.replay is None:
            return self.model(*inputs), None
        return self.replay.record(inputs)

    def _toggled(self, recorded: dict[fx.Node, Any] | None, toggled: tuple[str, ...], inputs: tuple[torch.Tensor, ...]) -> Any:
        if self.replay is None or recorded is None:
            return self.model(*inputs)
        return self.replay.rerun(recorded, toggled, inputs)

    def batch(self, inputs: tuple[torch.Tensor, ...]) -> None:
        result, everything = self.result, set(self.quantizers)
        references: dict[str, list[torch.Tensor]] = {name: [] for name in self.probes}
        set_fake_quant(self.quantizers, ())
        with _probing(self.probes, lambda name, out: references[name].append(out.detach().clone())):
            output, float_env = self._full(inputs)
        result.float_logits.append(_logits(output))
        set_fake_quant(self.quantizers, everything)
        with _probing(self.probes, _Comparer(references, result.cumulative)):
            output, all_env = self._full(inputs)
        result.config_logits["all"].append(_logits(output))
        for config, enabled in (("weights_only", self.weights), ("activations_only", self.activations)):
            set_fake_quant(self.quantizers, enabled)
            result.config_logits[config].append(_logits(self.model(*inputs)))
        for layer in self.layers:
            set_fake_quant(self.quantizers, layer.quantizers)
            probe = {layer.probe: self.probes[layer.probe]} if layer.probe else {}
            with _probing(probe, _Comparer(references, result.local)):
                output = self._toggled(float_env, layer.quantizers, inputs)
            result.isolated[layer.name].append(_logits(output))
        del float_env
        if self.leave_one_out:
            for layer in self.layers:
                set_fake_quant(self.quantizers, everything - set(layer.quantizers))
                output = self._toggled(all_env, layer.quantizers, inputs)
                result.leave_one_out[layer.name].append(_logits(output))
        result.batches += 1
        result.samples += result.float_logits[-1].shape[0]


def run_sweep(
    model: nn.Module,
    quantizers: dict[str, nn.Module],
    layers: list[QuantizedLayer],
    weights: set[str],
    loader: Iterable[Any],
    *,
    batches: int | None,
    device: torch.device,
    leave_one_out: bool = True,
    replay: bool = True,
) -> SweepResult:
    """Every pass of the sweep over the first ``batches`` batches (all when None).

    The caller freezes the model (eval, observers off) and restores its flags afterwards.
    ``replay=False`` runs every pass as a full forward.
    """
    sweep = _Sweep(model, quantizers, layers, weights, leave_one_out, replay)
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if batches is not None and index >= batches:
                break
            sweep.batch((_batch_parts(batch)[0].to(device),))
    return sweep.result
