"""Comparing images with baselines: matplotlib's RMS pixel difference, and the files kept on failure.

A failed comparison keeps ``baseline.png``, ``result.png`` and ``diff.png`` (an
:class:`ImageArtifacts`) under the results folder and lists them in the row's note.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from pytest_easyquant.check_report import Row, Summary
from pytest_easyquant.naming import sanitize
from pytest_easyquant.tolerances import Tolerance


@dataclass(frozen=True)
class ImageArtifacts:
    """The files kept for a failed image comparison."""

    baseline: str
    result: str
    diff: str | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.baseline, self.result, self.diff) if p)


def _png_size(data: bytes | None) -> tuple[int, int] | None:
    if not data or len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def compare_image(
    metric: str,
    baseline_png: bytes | None,
    obtained_png: bytes | None,
    tolerance: Tolerance,
    source: str,
    *,
    results_dir: Path,
) -> Row:
    """Compare two PNGs by matplotlib's RMS (0-255 scale); passes if RMS <= ``tolerance.atol``.

    Works in ``results_dir/<metric>/``: ``baseline.png`` and ``result.png`` (and ``diff.png``
    when pixels differ) are kept on failure and listed in ``note`` and ``artifacts``; on
    success the folder is removed.
    """
    folder = Path(results_dir) / sanitize(metric)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    b_size, o_size = _png_size(baseline_png), _png_size(obtained_png)
    if b_size is None or o_size is None:
        which = "baseline" if b_size is None else "obtained"
        return Row(metric, _size_text(b_size), _size_text(o_size), tolerance, source, False, f"the {which} image is not a PNG")
    folder.mkdir(parents=True, exist_ok=True)
    expected, actual = folder / "baseline.png", folder / "result.png"
    expected.write_bytes(baseline_png)
    actual.write_bytes(obtained_png)
    if b_size != o_size:
        artifacts = ImageArtifacts(str(expected), str(actual))
        note = f"image size differs: baseline {_size_text(b_size)}, now {_size_text(o_size)}\n" + _files_text(artifacts)
        return Row(metric, _size_text(b_size), _size_text(o_size), tolerance, source, False, note, artifacts.paths)
    from matplotlib.testing.compare import compare_images
    from matplotlib.testing.exceptions import ImageComparisonFailure

    try:
        # tol=0: None only for identical pixels, otherwise the RMS and a diff image.
        result = compare_images(str(expected), str(actual), tol=0, in_decorator=True)
    except ImageComparisonFailure as exc:
        artifacts = ImageArtifacts(str(expected), str(actual))
        note = f"images cannot be compared: {exc}\n" + _files_text(artifacts)
        return Row(metric, Summary("baseline.png"), Summary("result.png"), tolerance, source, False, note, artifacts.paths)
    rms = 0.0 if result is None else float(result["rms"])
    matplotlib_diff = folder / "result-failed-diff.png"
    if rms <= tolerance.atol:
        shutil.rmtree(folder, ignore_errors=True)
        return Row(metric, 0.0, rms, tolerance, source, True)
    diff = folder / "diff.png"
    if matplotlib_diff.exists():
        matplotlib_diff.replace(diff)
    artifacts = ImageArtifacts(str(expected), str(actual), str(diff) if diff.exists() else None)
    note = f"RMS pixel difference {rms:.4g} (0-255 scale) > {tolerance.atol:g}\n" + _files_text(artifacts)
    return Row(metric, 0.0, rms, tolerance, source, False, note, artifacts.paths)


def _size_text(size: tuple[int, int] | None) -> Summary:
    return Summary("not a PNG" if size is None else f"{size[0]}x{size[1]}")


def _files_text(artifacts: ImageArtifacts) -> str:
    lines = [f"baseline: {artifacts.baseline}", f"result:   {artifacts.result}"]
    if artifacts.diff:
        lines.append(f"diff:     {artifacts.diff}")
    return "\n".join(lines)
