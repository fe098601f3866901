"""Run eqcore's fake-quant kernels on any of their paths, from the tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import eqcore.quant.kernels as kernels

PATHS = ("host", "recompute", "device")


@contextlib.contextmanager
def kernel_path(path: str, chunk: int | None = None) -> Iterator[None]:
    """Run the kernels as on the CPU ("host": they read the zero point and each chunk's grid range
    on the host, and a weight quantized per channel keeps its factor of dS from the forward), as on
    the CPU with every backward recomputing from x ("recompute"), or as on any other device
    ("device": they read nothing back). ``chunk`` shrinks the chunk size so that one small tensor
    spans several chunks."""
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}; use one of {PATHS}")
    saved = kernels._reads_host, kernels.CHUNK, kernels.KEEP_FACTOR
    if path == "device":
        kernels._reads_host = lambda t: False
    if path == "recompute":
        kernels.KEEP_FACTOR = False
    if chunk is not None:
        kernels.CHUNK = chunk
    try:
        yield
    finally:
        kernels._reads_host, kernels.CHUNK, kernels.KEEP_FACTOR = saved
