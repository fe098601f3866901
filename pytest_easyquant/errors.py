"""The plugin's two failure kinds: a baseline that cannot be used, and a check outside tolerance.

Both carry a message meant for the user as it is; the plugin's items print them without a
traceback. :func:`run_check` is the single place that turns a check's report with failing rows
into a :class:`CheckFailure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_easyquant.check_report import CheckReport


class BaselineError(Exception):
    """A baseline file is missing, corrupt, truncated or of another schema.

    The message is one line that names the file and says what to do; ``path`` is the file;
    ``reason``, the message without the remedy (the plugin adds the command that applies).
    """

    def __init__(self, message: str, *, path: Path | str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.reason = reason if reason is not None else message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_baseline_error, (type(self), str(self), self.path, self.reason))


class MissingBaseline(BaselineError):
    """No baseline file exists yet (as opposed to one that exists but cannot be read)."""


def _rebuild_baseline_error(
    cls: type[BaselineError], message: str, path: Path | None, reason: str | None = None
) -> BaselineError:
    return cls(message, path=path, reason=reason)


class CheckFailure(AssertionError):
    """Some metric of a check is outside its tolerance; ``str()`` is the formatted report."""

    def __init__(self, report: CheckReport) -> None:
        super().__init__(report.format())
        self.report = report

    def __str__(self) -> str:
        return self.report.format()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.report,))


def run_check(report: CheckReport) -> None:
    """The one routine every check ends in: raise CheckFailure if any row failed."""
    if not report.passed:
        raise CheckFailure(report)
