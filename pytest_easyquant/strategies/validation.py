"""Argument checks shared by the strategies: each bad argument raises hypothesis's InvalidArgument.

Also the options every strategy reads the same way: ``None`` draws either value of a bool
option (:func:`_either`), ``ties`` is normalised once (:data:`TiesOption`), and scale exponents
stay above :data:`MIN_SCALE_EXPONENT`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

TiesOption = Literal["exact", "near"] | bool

MIN_SCALE_EXPONENT = -23
"""Scales below float32 eps (2**-23) are clamped by torch's kernels and eqcore's reference."""


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message)


def _check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise _invalid(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise _invalid(f"{name} must be <= {high}, got {value}")
    return value


def _check_optional_bool(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise _invalid(f"{name} must be True, False or None (either), got {value!r}")
    return value


def _either(draw: Any, value: bool | None) -> bool:
    return draw(st.booleans()) if value is None else value


def _normalize_ties(ties: Any) -> str | None:
    if ties is True or ties == "exact":
        return "exact"
    if ties == "near":
        return "near"
    if ties is False or ties is None:
        return None
    raise _invalid(f"ties must be 'exact' (or True), 'near' or False, got {ties!r}")


def _check_scale_exponents(scale_exponents: Any) -> tuple[int, int]:
    if not (isinstance(scale_exponents, Sequence) and len(scale_exponents) == 2):
        raise _invalid(f"scale_exponents must be a (low, high) pair of ints, got {scale_exponents!r}")
    low = _check_int("scale_exponents[0]", scale_exponents[0], MIN_SCALE_EXPONENT, 64)
    high = _check_int("scale_exponents[1]", scale_exponents[1], low, 64)
    return low, high
