"""A reusable property checker for fake-quantization functions and their gradients.

``check_fake_quantize(fn, x, scale, zero_point, quant_min, quant_max, ...)`` runs ``fn`` forward
and backward and checks it against a float64 reference built from explicit masks (never from
``torch.clamp``, whose subgradient at the bounds is 0 or 1/2), plus the relational properties of
DESIGN.md section 4: on-grid output, idempotence, dX is the mask, linearity in dY, exact
grad-factor scaling, dZ = -s * sum(dY outside), |dS per element| <= 1/2 inside.

``fn(x, scale, zero_point, quant_min, quant_max, ch_axis, grad_factor) -> y`` must be
differentiable in x, scale and zero_point; ``ch_axis`` is None for per-tensor quantization.
Wrap a module-based quantizer in a small function to check it. Used by eqcore's own tests; no
pytest dependency.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FakeQuantFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class FakeQuantResult:
    """Output and gradients of one forward+backward."""

    y: torch.Tensor
    grad_x: torch.Tensor
    grad_scale: torch.Tensor
    grad_zero_point: torch.Tensor


@dataclass
class CheckReport:
    """Every property that failed, with a readable line each; ``ok`` when there were none."""

    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def raise_if_failed(self) -> None:
        if self.failures:
            raise AssertionError("fake quantization check failed:\n  " + "\n  ".join(self.failures))


def grid_coordinate(x: torch.Tensor, scale: torch.Tensor, *, reciprocal: bool = True) -> torch.Tensor:
    """u = x / s as float64. With ``reciprocal`` it is x * (1/s) computed as the quantizer does:
    in float32 for float32/16/bfloat16 inputs (torch's kernels), in float64 for float64 ones."""
    if not reciprocal:
        return x.double() / scale.double()
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(compute) * torch.reciprocal(scale.to(compute))).double()


def reference_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    *,
    ch_axis: int | None = None,
    grad_factor: float = 1.0,
    grad_y: torch.Tensor | None = None,
    reciprocal: bool = True,
) -> FakeQuantResult:
    """The DESIGN.md section 4 numerics in float64, with explicit inside/below/above masks."""
    if ch_axis is not None:
        ch_axis %= x.dim()
    shape = [1] * x.dim()
    if ch_axis is not None:
        shape[ch_axis] = -1
    s = scale.detach().double().clamp_min(torch.finfo(torch.float32).eps).reshape(shape)
    z = torch.round(zero_point.detach().double()).clamp(quant_min, quant_max).reshape(shape)
    u = grid_coordinate(x.detach(), s, reciprocal=reciprocal)
    q = torch.round(u) + z
    below = q < quant_min
    above = q > quant_max
    inside = ~(below | above) & ~torch.isnan(q)
    qc = torch.where(below, torch.full_like(q, quant_min), torch.where(above, torch.full_like(q, quant_max), q))
    y = (qc - z) * s
    dy = torch.ones_like(u) if grad_y is None else grad_y.double()
    zero = torch.zeros_like(u)
    grad_x = torch.where(inside, dy, zero)
    per_element_scale = torch.where(
        inside,
        dy * (torch.round(u) - u),
        torch.where(below, dy * (quant_min - z), torch.where(above, dy * (quant_max - z), zero)),
    )
    per_element_zero = torch.where(below | above, -dy * s, zero)
    # NaN inputs propagate into dS and dZ (the quantizer's documented policy).
    nan = torch.isnan(q)
    per_element_scale = torch.where(nan, torch.full_like(u, math.nan), per_element_scale)
    per_element_zero = torch.where(nan, torch.full_like(u, math.nan), per_element_zero)
    dims = [d for d in range(x.dim()) if d != ch_axis] if ch_axis is not None else list(range(x.dim()))
    def reduce(t: torch.Tensor) -> torch.Tensor:
        if ch_axis is None:
            return t.sum().reshape(1)
        return t.sum(dims) if dims else t
    return FakeQuantResult(
        y=y,
        grad_x=grad_x,
        grad_scale=reduce(per_element_scale) * grad_factor,
        grad_zero_point=reduce(per_element_zero) * grad_factor,
    )


def run_fake_quantize(
    fn: FakeQuantFn,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    *,
    ch_axis: int | None = None,
    grad_factor: float = 1.0,
    grad_y: torch.Tensor | None = None,
) -> FakeQuantResult:
    """One forward+backward of ``fn`` on fresh leaf copies of the inputs."""
    x = x.detach().clone().requires_grad_(True)
    scale = scale.detach().clone().requires_grad_(True)
    zero_point = zero_point.detach().clone().requires_grad_(True)
    y = fn(x, scale, zero_point, quant_min, quant_max, ch_axis, grad_factor)
    dy = torch.ones_like(y) if grad_y is None else grad_y.to(y.dtype)
    grad_x, grad_scale, grad_zero_point = torch.autograd.grad(
        y, (x, scale, zero_point), dy, allow_unused=True
    )
    zeros = torch.zeros_like
    return FakeQuantResult(
        y=y.detach(),
        grad_x=grad_x if grad_x is not None else zeros(x),
        grad_scale=grad_scale if grad_scale is not None else zeros(scale),
        grad_zero_point=grad_zero_point if grad_zero_point is not None else zeros(zero_point),
    )


def _close(a: torch.Tensor, b: torch.Tensor, *, rtol: float, atol: torch.Tensor | float) -> bool:
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    ok = (a - b).abs() <= atol + rtol * b.abs()
    return bool((ok | both_nan).all())


def _summation_tolerance(dy: torch.Tensor, terms_bound: torch.Tensor, ch_axis: int | None, grad_factor: float, dtype: torch.dtype) -> torch.Tensor:
    """Absolute tolerance for a reduced gradient: the float summation error of its terms."""
    eps = torch.finfo(dtype).eps if dtype != torch.float64 else torch.finfo(torch.float64).eps
    magnitude = (dy.double().abs() * terms_bound)
    if ch_axis is None:
        total = magnitude.sum().reshape(1)
        count = dy.numel()
    else:
        dims = [d for d in range(dy.dim()) if d != ch_axis]
        total = magnitude.sum(dims) if dims else magnitude
        count = max(1, dy.numel() // max(1, dy.shape[ch_axis]))
    return (total * 8 * eps * math.sqrt(count) + 1e-12) * abs(grad_factor)


def check_fake_quantize(
    fn: FakeQuantFn,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    *,
    ch_axis: int | None = None,
    grad_factor: float = 1.0,
    grad_y: torch.Tensor | None = None,
    reciprocal: bool = True,
    raise_on_failure: bool = True,
) -> CheckReport:
    """Check ``fn`` on one input against the reference and the relational properties.

    Forward and dX must match exactly (they involve no summation); dS and dZ within the float
    summation error of their terms. Returns a report, raising AssertionError on failure unless
    ``raise_on_failure=False``.
    """
    report = CheckReport()
    if ch_axis is not None:
        ch_axis %= x.dim()
    if grad_y is None:
        grad_y = torch.linspace(-1.0, 1.0, x.numel(), dtype=x.dtype).reshape(x.shape) if x.numel() else torch.ones_like(x)
    got = run_fake_quantize(
        fn, x, scale, zero_point, quant_min, quant_max, ch_axis=ch_axis, grad_factor=grad_factor, grad_y=grad_y
    )
    ref = reference_fake_quantize(
        x, scale, zero_point, quant_min, quant_max,
        ch_axis=ch_axis, grad_factor=grad_factor, grad_y=grad_y, reciprocal=reciprocal,
    )
    value_tol = torch.finfo(x.dtype).eps * ref.y.abs() if x.dtype in (torch.float16, torch.bfloat16) else 0.0
    if x.dtype in (torch.float16, torch.bfloat16):
        ref_y = ref.y.to(x.dtype).double()
    elif x.dtype == torch.float32:
        ref_y = ref.y.float().double()
    else:
        ref_y = ref.y
    if not _close(got.y, ref_y, rtol=0.0, atol=value_tol):
        bad = int(((got.y.double() - ref_y).abs() > 0).sum())
        report.fail(f"forward differs from the reference at {bad} of {x.numel()} elements")
    shape = [1] * x.dim()
    if ch_axis is not None:
        shape[ch_axis] = -1
    s = scale.detach().double().clamp_min(torch.finfo(torch.float32).eps).reshape(shape)
    z = torch.round(zero_point.detach().double()).clamp(quant_min, quant_max).reshape(shape)
    finite = torch.isfinite(got.y)
    grid = got.y.double() / s + z
    if x.dtype == torch.float64 and not bool((grid[finite] - torch.round(grid[finite])).abs().le(1e-6).all()):
        report.fail("forward output is not on the quantization grid")
    if not _close(got.grad_x, ref.grad_x.to(x.dtype), rtol=0.0, atol=0.0):
        report.fail("dX is not dY masked to the inside of the grid")
    bound = torch.maximum(torch.full_like(s, 0.5), torch.maximum((quant_min - z).abs(), (quant_max - z).abs()))
    scale_tol = _summation_tolerance(grad_y, bound.expand_as(grad_y.double()), ch_axis, grad_factor, x.dtype)
    param_rtol = torch.finfo(scale.dtype).eps
    if not _close(got.grad_scale.reshape(-1), ref.grad_scale, rtol=param_rtol, atol=scale_tol):
        report.fail(f"dS {got.grad_scale.reshape(-1).tolist()[:4]} != reference {ref.grad_scale.tolist()[:4]} (tol {scale_tol.tolist()[:4]})")
    zero_tol = _summation_tolerance(grad_y, s.expand_as(grad_y.double()), ch_axis, grad_factor, x.dtype)
    if not _close(got.grad_zero_point.reshape(-1), ref.grad_zero_point, rtol=param_rtol, atol=zero_tol):
        report.fail(f"dZ {got.grad_zero_point.reshape(-1).tolist()[:4]} != reference {ref.grad_zero_point.tolist()[:4]}")
    again = run_fake_quantize(fn, got.y.to(x.dtype), scale, zero_point, quant_min, quant_max, ch_axis=ch_axis, grad_factor=grad_factor)
    if not _close(again.y, got.y, rtol=0.0, atol=0.0):
        report.fail("not idempotent: fake-quantizing the output changes it")
    # Gradients come back in the qparams' dtype, so their relations hold to its precision.
    relation_rtol = 1e-12 if x.dtype == torch.float64 and scale.dtype == torch.float64 else 1e-6
    doubled = run_fake_quantize(
        fn, x, scale, zero_point, quant_min, quant_max, ch_axis=ch_axis, grad_factor=grad_factor, grad_y=grad_y * 2
    )
    for name, one, two in (
        ("dX", got.grad_x, doubled.grad_x),
        ("dS", got.grad_scale, doubled.grad_scale),
        ("dZ", got.grad_zero_point, doubled.grad_zero_point),
    ):
        if not _close(two, one * 2, rtol=relation_rtol, atol=1e-30):
            report.fail(f"{name} is not linear in dY (2*dY did not double it)")
    if grad_factor != 0:
        unit = run_fake_quantize(
            fn, x, scale, zero_point, quant_min, quant_max, ch_axis=ch_axis, grad_factor=1.0, grad_y=grad_y
        )
        for name, scaled, plain in (("dS", got.grad_scale, unit.grad_scale), ("dZ", got.grad_zero_point, unit.grad_zero_point)):
            if not _close(scaled, plain * grad_factor, rtol=relation_rtol, atol=1e-30):
                report.fail(f"{name} does not scale exactly with grad_factor")
        if not _close(unit.grad_x, got.grad_x, rtol=0.0, atol=0.0):
            report.fail("grad_factor changed dX (it must only scale dS and dZ)")
    if raise_on_failure:
        report.raise_if_failed()
    return report
