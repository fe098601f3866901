"""Run eqcore's fake-quant kernels on either of their paths, from the tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import eqcore.quantizers as quantizers


@contextlib.contextmanager
def kernel_path(path: str, chunk: int | None = None) -> Iterator[None]:
    """Run the kernels as on the CPU ("host": they read the zero point and each chunk's grid range
    on the host) or as on any other device ("device": they read nothing back). ``chunk`` shrinks
    the chunk size so that one small tensor spans several chunks."""
    saved = quantizers._reads_host, quantizers.CHUNK
    if path == "device":
        quantizers._reads_host = lambda t: False
    if chunk is not None:
        quantizers.CHUNK = chunk
    try:
        yield
    finally:
        quantizers._reads_host, quantizers.CHUNK = saved
