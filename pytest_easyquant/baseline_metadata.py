"""What a baseline was recorded with: library versions, platform, recipe, data, backend.

A failure prints :meth:`BaselineMetadata.differences` (``torch: baseline 2.14.1, now 2.15.0``),
so a change caused by an upgrade, another machine or a changed recipe says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any

from pytest_easyquant import cpu_kernels

SCHEMA_VERSION = 1

_VERSIONED = ("torch", "torchvision", "numpy", "matplotlib", "pytest_easyquant")
_DISTRIBUTIONS = {"pytest_easyquant": "pytest-easyquant"}


@lru_cache(maxsize=None)
def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(_DISTRIBUTIONS.get(name, name))
    except metadata.PackageNotFoundError:
        if name == "pytest_easyquant":
            from pytest_easyquant import __version__

            return __version__
        return "unknown"


def json_default(value: Any) -> Any:
    """numpy scalars and arrays as plain Python values (float32 via its exact float64 value)."""
    if hasattr(value, "dtype") and hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _canonical(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=json_default))


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, sub in value.items():
            flat.update(_flatten(f"{prefix}.{key}", sub))
        return flat
    return {prefix: value}


@lru_cache(maxsize=None)
def _environment() -> dict[str, str]:
    """Platform (system-machine), Python, matplotlib's FreeType version and the CPU kernels."""
    import platform

    try:
        from matplotlib import ft2font

        freetype = str(ft2font.__freetype_version__)
    except ImportError:
        freetype = "unknown"
    return {
        "platform": f"{platform.system()}-{platform.machine()}",
        "python": platform.python_version(),
        "freetype": freetype,
        "cpu": cpu_kernels.describe(),
    }


_OPTIONAL = ("schema_version", "platform", "python", "freetype", "backend", "libraries", "cpu")


@dataclass(frozen=True)
class BaselineMetadata:
    """What a baseline was recorded with, so a failure can say what changed since."""

    model: str
    weights: str
    recipe: dict[str, Any] = field(hash=False)
    data: str
    seed: int
    calib_batches: int
    device: str
    torch: str
    torchvision: str
    numpy: str
    matplotlib: str
    pytest_easyquant: str
    schema_version: int = SCHEMA_VERSION
    # Recorded since 0.1 (issue 18); None in baselines written before, and then not compared.
    platform: str | None = None
    python: str | None = None
    freetype: str | None = None
    backend: str | None = None  # the preparation backend taken ("fx" or "pt2e")
    # Versions of the optional libraries a run used (torchao for PT2E, timm, transformers); {} when none.
    libraries: dict[str, str] = field(default_factory=dict, hash=False)
    # The CPU kernels (``cpu_kernels.describe()``), recorded since issue 16's session; None before.
    cpu: str | None = None

    @classmethod
    def current(
        cls,
        *,
        model: str,
        weights: str,
        recipe: dict[str, Any],
        data: str,
        seed: int,
        calib_batches: int,
        device: str,
        backend: str | None = None,
        libraries: tuple[str, ...] = (),
    ) -> BaselineMetadata:
        """This run's metadata, with the installed library versions ("unknown" if absent), the
        platform, Python, matplotlib's FreeType (text rendering differs between its versions), and
        the versions of the optional ``libraries`` the run used (torchao, timm, transformers)."""
        versions = {name: _version(name) for name in _VERSIONED}
        return cls(
            model=model, weights=weights, recipe=dict(recipe), data=data, seed=seed,
            calib_batches=calib_batches, device=device, **versions, **_environment(), backend=backend,
            libraries={name: _version(name) for name in libraries},
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaselineMetadata:
        """Unknown keys are ignored; missing ones or a non-dict recipe raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"metadata is a {type(data).__name__}, not an object")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data and n not in _OPTIONAL]
        if missing:
            raise ValueError(f"metadata lacks {', '.join(missing)}")
        if not isinstance(data["recipe"], Mapping):
            raise ValueError("metadata recipe is not an object")
        values = {n: data[n] for n in names if n in data}
        values["recipe"] = dict(values["recipe"])
        if "libraries" in values:
            if not isinstance(values["libraries"], Mapping):
                raise ValueError("metadata libraries is not an object")
            values["libraries"] = dict(values["libraries"])
        return cls(**values)

    def differences(self, other: BaselineMetadata) -> list[str]:
        """Lines like ``torch: baseline 2.14.1, now 2.15.0`` (self = baseline, other = now)."""
        lines = []
        mine, theirs = _canonical(self.recipe), _canonical(other.recipe)
        if mine.get("name") != theirs.get("name"):
            lines.append(f"recipe: baseline {_short(mine.get('name'))}, now {_short(theirs.get('name'))}")
        elif mine != theirs:
            flat_mine, flat_theirs = _flatten("recipe", mine), _flatten("recipe", theirs)
            for key in sorted(set(flat_mine) | set(flat_theirs)):
                if flat_mine.get(key, "(absent)") != flat_theirs.get(key, "(absent)"):
                    lines.append(
                        f"{key}: baseline {_short(flat_mine.get(key, '(absent)'))}, "
                        f"now {_short(flat_theirs.get(key, '(absent)'))}"
                    )
        for name in sorted(set(self.libraries) | set(other.libraries)):
            before, after = self.libraries.get(name, "(absent)"), other.libraries.get(name, "(absent)")
            if before != after:
                lines.append(f"{name}: baseline {_short(before)}, now {_short(after)}")
        for f in fields(self):
            if f.name in ("recipe", "libraries"):
                continue
            before, after = getattr(self, f.name), getattr(other, f.name)
            if before is None and f.name in _OPTIONAL:
                continue  # not recorded by the version that wrote the baseline
            if before != after:
                lines.append(f"{f.name}: baseline {_short(before)}, now {_short(after)}")
        return lines

    def kernels_note(self, other: BaselineMetadata) -> str:
        """A line for a failure when the baseline (self) was recorded on other CPU kernels than this
        run (other): their float rounding differs, and quantization amplifies it; else ""."""
        if self.cpu is None or other.cpu is None or self.cpu == other.cpu or self.device != "cpu":
            return ""
        return (
            f"the baseline was recorded on other CPU kernels ({self.cpu}; now {other.cpu}): their float "
            "rounding differs, and a quantized model turns that into rounding flips that grow layer by "
            "layer, so record baselines where they are compared, or pin the kernels on both machines "
            "(--eq-pin-kernels; README, 'Baselines across machines')"
        )

    def rendering_note(self, other: BaselineMetadata) -> str:
        """A line for an image failure when the baseline (self) was drawn with another matplotlib
        or FreeType than this run (other), which alone moves text and antialiasing; else ""."""
        changed = [
            f"{label} {getattr(self, name)} (now {getattr(other, name)})"
            for name, label in (("matplotlib", "matplotlib"), ("freetype", "FreeType"))
            if getattr(self, name) is not None and getattr(self, name) != getattr(other, name)
        ]
        if not changed:
            return ""
        return (
            f"the baseline image was drawn with {' and '.join(changed)}: text and antialiasing differ "
            "between their versions, so compare plots on the setup that recorded them, or re-record them here"
        )
