"""PNG files as ``data:`` URIs, so the report shows a failure's images with nothing beside it.

Plots have few colours: a 256-colour palette keeps them as they look at a third of the bytes
(about 25 KB instead of 70 KB for an 800x600 SA plot), which keeps a report with dozens of image
failures at a few MB. Without Pillow, or for a file Pillow cannot read, the bytes go in as they are.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedImage:
    uri: str
    width: int | None
    height: int | None


def _palette_png(data: bytes) -> tuple[bytes, int, int] | None:
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        return None
    buffer = io.BytesIO()
    rgb.quantize(256, method=Image.Quantize.FASTOCTREE).save(buffer, "PNG", compress_level=6)
    small = buffer.getvalue()
    return (small if len(small) < len(data) else data), rgb.width, rgb.height


def embed_png(path: str | Path) -> EmbeddedImage | None:
    """``path`` as an inline PNG, or None when the file is gone."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    converted = _palette_png(data)
    width = height = None
    if converted is not None:
        data, width, height = converted
    return EmbeddedImage("data:image/png;base64," + base64.b64encode(data).decode("ascii"), width, height)
