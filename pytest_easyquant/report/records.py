"""What a check and a model run leave for the reports, in a form that travels from xdist workers.

:class:`MetricRecord` is one compared metric (a :class:`~pytest_easyquant.check_report.Row` with
its values made JSON-safe); :class:`RunInfo` describes one model run (configuration, versions,
layer order, the command that records its baselines). Both convert to and from plain dicts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

from pytest_easyquant.check_report import ArrayDiff, Row


def jsonable(value: Any) -> Any:
    """A number, string, bool or None standing for ``value`` (numpy scalars become floats,
    anything else its text)."""
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


class MetricRecord(NamedTuple):
    """One compared metric as the reports see it.

    A NamedTuple so the first six fields still read as the ``[metric, baseline, obtained, delta,
    tolerance, passed]`` rows the terminal summary indexes. ``tolerance`` is its description
    (``atol=0.1 rtol=0``), ``atol``/``rtol``/``source`` the same in parts; ``array`` says how two
    arrays differ; ``artifacts`` are the files kept for a failed image.
    """

    metric: str
    baseline: Any
    obtained: Any
    delta: float | None
    tolerance: str
    passed: bool
    source: str = ""
    atol: float | None = None
    rtol: float | None = None
    note: str = ""
    array: ArrayDiff | None = None
    artifacts: tuple[str, ...] = ()

    @classmethod
    def from_row(cls, row: Row, *, written: bool = False) -> MetricRecord:
        """``row`` for the reports; a written baseline has no baseline value or delta yet."""
        return cls(
            metric=row.metric,
            baseline=None if written else jsonable(row.baseline),
            obtained=jsonable(row.obtained),
            delta=None if written else jsonable(row.delta),
            tolerance=row.tolerance.describe(),
            passed=bool(row.passed),
            source=row.tolerance_source,
            atol=float(row.tolerance.atol),
            rtol=float(row.tolerance.rtol),
            note=row.note,
            array=row.array,
            artifacts=tuple(row.artifacts),
        )

    def to_dict(self) -> dict[str, Any]:
        data = self._asdict()
        data["array"] = asdict(self.array) if self.array is not None else None
        data["artifacts"] = list(self.artifacts)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | list[Any]) -> MetricRecord:
        if isinstance(data, list):  # the six-column rows of earlier versions
            return cls(*data[:6])
        values = dict(data)
        values["array"] = ArrayDiff(**values["array"]) if values.get("array") else None
        values["artifacts"] = tuple(values.get("artifacts") or ())
        return cls(**{k: v for k, v in values.items() if k in cls._fields})

    @property
    def is_number(self) -> bool:
        """Whether the obtained value is a finite-or-not number (not a summary or a string)."""
        return isinstance(self.obtained, (int, float)) and not isinstance(self.obtained, bool)

    @property
    def is_finite(self) -> bool:
        return self.is_number and math.isfinite(self.obtained)


VERSION_LABELS = (
    ("torch", "torch"), ("torchvision", "torchvision"), ("numpy", "numpy"), ("matplotlib", "matplotlib"),
    ("freetype", "FreeType"), ("python", "Python"), ("platform", "platform"), ("cpu", "CPU kernels"),
    ("pytest_easyquant", "pytest-easyquant"),
)
"""The baseline-metadata fields a run's ``RunInfo.versions`` carries, each with its label in the reports."""


@dataclass
class RunInfo:
    """One model run's configuration, as the report header and the JSON summary show it.

    ``baseline_recipe`` is None when the run compares against its own recipe's baselines;
    ``layers`` are the quantized weighted layers in network order (the per-layer charts' x axis);
    ``record_command`` records the run's missing baselines as printed.
    """

    suite: str
    model: str
    weights: str
    recipe: str
    baseline_recipe: str | None
    backend: str
    data: str
    seed: int
    device: str
    cle: bool
    calib_batches: int
    batch_size: int
    sa_batches: int
    baseline_dir: str
    record_command: str
    versions: dict[str, str] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunInfo:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
