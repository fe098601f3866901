"""Hypothesis strategies for property-testing fake quantizers.

Draw quantization ranges, qparams, shapes and inputs laid out on the quantization grid, and
whole cases ready for :func:`eqcore.testing.check_fake_quantize`::

    from hypothesis import given
    from pytest_easyquant.strategies import fake_quant_cases

    @given(fake_quant_cases())
    def test_my_fake_quant(case):
        case.check(my_fake_quant)  # fn(x, scale, zero_point, quant_min, quant_max, ch_axis, grad_factor)

Inputs are drawn in grid units on both sides of the range, on its bounds and on rounding ties
(see :mod:`pytest_easyquant.strategies.grids`, also for the ``ties`` option). Everything is
drawn from hypothesis (no global random state), tensors are small, and a failing case shrinks
to a few values and prints as Python that rebuilds it exactly.

The strategies live by concern: argument checks (``validation``), quantization ranges and
qparams (``ranges``), shapes and values on the grid (``grids``) and whole cases (``cases``).

Needs hypothesis (``pip install hypothesis``, or the ``test`` extra of pytest-easyquant).
"""

from __future__ import annotations

try:
    import hypothesis  # noqa: F401 - every submodule draws with it: say how to install it first
except ImportError as exc:  # pragma: no cover - exercised by a test that hides hypothesis
    raise ImportError(
        "pytest_easyquant.strategies needs hypothesis: pip install hypothesis "
        "(or pip install 'pytest-easyquant[test]')"
    ) from exc

from pytest_easyquant.strategies.cases import FakeQuantCase, fake_quant_cases
from pytest_easyquant.strategies.grids import grid_values, shapes
from pytest_easyquant.strategies.ranges import QParams, qparams, quant_ranges
from pytest_easyquant.strategies.validation import MIN_SCALE_EXPONENT, TiesOption  # noqa: F401 - public constants

__all__ = [
    "FakeQuantCase",
    "QParams",
    "fake_quant_cases",
    "grid_values",
    "qparams",
    "quant_ranges",
    "shapes",
]
