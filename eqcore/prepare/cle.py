"""Cross-layer equalization (CLE, Nagel et al. 2019, "Data-Free Quantization").

For two layers with only positively homogeneous ops between them (``f(s x) = s f(x)`` for
s > 0, e.g. ReLU), scaling output channel i of the first layer by 1/s_i and input channel i of the
second by s_i leaves the float model unchanged. Choosing ``s_i = sqrt(r1_i / r2_i)`` (r = per-channel max |W|)
gives both layers the same per-channel ranges, which makes per-tensor weight quantization lose much
less. Conv -> depthwise -> conv chains are equalized as triplets with the cube-root rule.

The groups come from `eqcore.prepare.cle_pairs.find_cle_pairs` (or are named by hand);
`relu6_to_relu` removes the ReLU6 clips that block many pairs.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from eqcore.prepare.cle_rules import _LAYER_TYPES, _is_depthwise, _pair_problem
from eqcore.prepare.fusion import PREACT_MEAN, PREACT_STD

__all__ = [
    "equalize",
    "relu6_to_relu",
]


def relu6_to_relu(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every ReLU6 (``nn.ReLU6`` modules, ``F.relu6`` calls in an FX graph) by ReLU.

    This CHANGES the model's function (activations above 6 are no longer clipped). The DFQ paper
    does it for MobileNetV2 because ReLU6 is not positively homogeneous and so blocks CLE; the
    changed model usually needs re-evaluation (or fine-tuning) before use.
    Returns a modified deep copy, or ``model`` itself when ``inplace=True``.
    """
    model = model if inplace else copy.deepcopy(model)
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.ReLU6)]
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, nn.ReLU(inplace=getattr(parent, child_name).inplace))
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target is F.relu6:
                node.target = F.relu
        model.recompile()
    return model


@dataclass
class _Layer:
    """A Conv/Linear weight seen as per-channel rows; scaling is done in float64."""

    name: str
    module: nn.Module

    @property
    def depthwise(self) -> bool:
        return _is_depthwise(self.module)

    def _weight(self) -> torch.Tensor:
        return self.module.weight.detach().double()

    def out_ranges(self) -> torch.Tensor:
        w = self._weight()
        return w.reshape(w.shape[0], -1).abs().amax(dim=1)

    def in_ranges(self) -> torch.Tensor:
        if self.depthwise:
            return self.out_ranges()
        w = self._weight().transpose(0, 1)
        return w.reshape(w.shape[0], -1).abs().amax(dim=1)

    def scale_out(self, s: torch.Tensor) -> None:
        """Output channel i (and bias i) divided by s_i."""
        w = self._weight()
        shape = (-1,) + (1,) * (w.dim() - 1)
        with torch.no_grad():
            self.module.weight.copy_(w / s.reshape(shape))
            if self.module.bias is not None:
                self.module.bias.copy_(self.module.bias.detach().double() / s)
            for name in (PREACT_MEAN, PREACT_STD):
                statistic = getattr(self.module, name, None)
                if isinstance(statistic, torch.Tensor):
                    statistic.copy_(statistic.double() / s)

    def scale_in(self, s: torch.Tensor) -> None:
        """Input channel i multiplied by s_i."""
        w = self._weight()
        if self.depthwise:
            shape = (-1,) + (1,) * (w.dim() - 1)
        else:
            shape = (1, -1) + (1,) * (w.dim() - 2)
        with torch.no_grad():
            self.module.weight.copy_(w * s.reshape(shape))


def _negligible(r: torch.Tensor, rtol: float) -> torch.Tensor:
    return (r <= rtol * r.max()) | ~torch.isfinite(r)


def _equalize_pair(first: _Layer, second: _Layer, rtol: float) -> float:
    r1, r2 = first.out_ranges(), second.in_ranges()
    s = torch.sqrt(r1 / r2)
    s = torch.where(_negligible(r1, rtol) | _negligible(r2, rtol), torch.ones_like(s), s)
    first.scale_out(s)
    second.scale_in(s)
    return (1 - s).abs().max().item()


def _equalize_triplet(first: _Layer, middle: _Layer, last: _Layer, rtol: float) -> float:
    """Cube-root rule: all three per-channel ranges become t = (r1 r2 r3)^(1/3).

    first: out channel i / s1 (s1 = r1 / t); depthwise: channel i * s1 / s2 (s2 = t / r3);
    last: in channel i * s2.
    """
    r1, r2, r3 = first.out_ranges(), middle.out_ranges(), last.in_ranges()
    skip = _negligible(r1, rtol) | _negligible(r2, rtol) | _negligible(r3, rtol)
    t = torch.pow(r1 * r2 * r3, 1.0 / 3.0)
    s1 = torch.where(skip, torch.ones_like(t), r1 / t)
    s2 = torch.where(skip, torch.ones_like(t), t / r3)
    first.scale_out(s1)
    middle.scale_in(s1)
    middle.scale_out(s2)
    last.scale_in(s2)
    return max((1 - s1).abs().max().item(), (1 - s2).abs().max().item())


def _resolve_groups(model: nn.Module, pairs: Sequence[Sequence[str]]) -> list[list[_Layer]]:
    groups: list[list[_Layer]] = []
    for group in pairs:
        names = [str(name) for name in group]
        if len(names) not in (2, 3):
            raise ValueError(f"a CLE group must name 2 or 3 layers, got {names}")
        layers = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError as exc:
                raise ValueError(f"CLE group {names}: the model has no submodule {name!r}") from exc
            if not isinstance(module, _LAYER_TYPES):
                raise ValueError(
                    f"CLE group {names}: {name!r} is a {type(module).__name__}; "
                    "only Conv1d/2d/3d and Linear can be equalized"
                )
            layers.append(_Layer(name, module))
        if len(layers) == 3 and not layers[1].depthwise:
            raise ValueError(
                f"CLE triplet {names}: the middle layer must be a depthwise conv "
                "(groups == in_channels == out_channels)"
            )
        for a, b in zip(layers, layers[1:]):
            problem = _pair_problem(a.name, a.module, b.name, b.module, flattened=True)
            if problem is not None:
                raise ValueError(f"CLE group {names} cannot be equalized: {problem}")
        groups.append(layers)
    return groups


def equalize(
    model: nn.Module,
    pairs: Sequence[Sequence[str]],
    threshold: float = 1e-4,
    inplace: bool = False,
    *,
    max_iter: int = 100,
    zero_range_rtol: float = 1e-8,
) -> nn.Module:
    """Cross-layer equalize ``pairs`` of ``model`` (our own implementation of DFQ's CLE).

    ``pairs`` holds ``[first, second]`` layer names (``first``'s output channels feed ``second``'s
    input channels through positively homogeneous ops only) or ``[conv, depthwise, conv]`` triplets,
    e.g. from `find_cle_pairs`. Pairs use ``s_i = sqrt(r1_i / r2_i)``, triplets the cube-root rule;
    ``s_i = 1`` where a range is at most ``zero_range_rtol`` times its layer's largest range (dead
    channels). All groups are swept repeatedly until ``max|1 - s| < threshold`` or ``max_iter``
    sweeps (then a RuntimeWarning says so). Scales are computed in float64.

    The float model's output is unchanged (up to rounding). Returns a deep copy unless ``inplace``.
    """
    if threshold <= 0 or max_iter < 1:
        raise ValueError(f"need threshold > 0 and max_iter >= 1, got {threshold}, {max_iter}")
    model = model if inplace else copy.deepcopy(model)
    groups = _resolve_groups(model, pairs)
    if not groups:
        return model
    deviation = math.inf
    for _ in range(max_iter):
        deviation = 0.0
        for group in groups:
            if len(group) == 2:
                step = _equalize_pair(group[0], group[1], zero_range_rtol)
            else:
                step = _equalize_triplet(group[0], group[1], group[2], zero_range_rtol)
            deviation = max(deviation, step)
        if deviation < threshold:
            return model
    warnings.warn(
        f"equalize did not converge in {max_iter} sweeps (max |1 - s| = {deviation:.3g} >= "
        f"threshold {threshold:.3g}); raise max_iter or threshold",
        RuntimeWarning,
        stacklevel=2,
    )
    return model
