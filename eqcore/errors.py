"""The one exception type for inputs a user can fix (model name, weights, data, sample).

It subclasses ValueError so generic callers can catch it; the plugin turns it into a pytest
``UsageError``. Messages name the bad input and say what to pass instead.
"""

from __future__ import annotations

__all__ = ["EQError"]


class EQError(ValueError):
    """A bad user input; the message names it and says how to fix it."""
