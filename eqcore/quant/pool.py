"""Recycled storage for the fake-quant kernels' large CPU outputs (y in forward, dX in backward,
and the factor of dS that per-channel quantization keeps between them, which dX then reuses).

A fresh large allocation costs a page fault per 4 KiB page on its first write. On this project's
CI machine that is about 1 us a page: up to 4 ms a step for the output and dX of a 512x512x3x3
weight, depending on where malloc happens to place them (it returns freed memory to the system
and takes it back as the heap shrinks and grows). Recycled memory costs nothing, and within one
training step the backward's dX reuses the storage of the forward output its layer has freed.

A storage is handed out again only once nothing else references it: its use count is then the
pool's own reference (views, saved tensors, numpy arrays and DLPack capsules all hold one). The
tensors handed out are not views (autograd forbids in-place ops on views made inside a custom
Function). The pool holds at most ``max_bytes`` of storage: when a new tensor would exceed it,
the idle storage is dropped first (shapes change), and if that is not enough, the tensor gets
the usual allocation, as small or non-CPU tensors do. (Under torch.compile the quantizers run
``eqcore.quant.fused``, whose outputs are inductor's.)
:func:`release_buffers` frees the idle storage.
"""

from __future__ import annotations

import math
import threading

import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)


class OutputPool:
    def __init__(self, max_bytes: int = 256 << 20, min_bytes: int = 1 << 20) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self._storages: dict[tuple[torch.dtype, int], list[torch.UntypedStorage]] = {}
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """Bytes of storage the pool holds, in use or idle."""
        return self._held

    def empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised contiguous tensor, on recycled storage where the pool has some."""
        nbytes = math.prod(shape) * dtype.itemsize
        if device.type != "cpu" or _use_count is None or nbytes < self.min_bytes:
            return torch.empty(shape, dtype=dtype, device=device)
        storage = self._take(dtype, nbytes)
        if storage is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def _take(self, dtype: torch.dtype, nbytes: int) -> torch.UntypedStorage | None:
        key = (dtype, nbytes)
        with self._lock:
            storages = self._storages.setdefault(key, [])
            for storage in storages:
                if _use_count(storage._cdata) == 1:
                    if storage.nbytes() == nbytes:
                        return storage
            if self._held + nbytes > self.max_bytes:
                self._release_idle()  # make room: shapes change, the storage of old ones is idle
                if self._held + nbytes > self.max_bytes:
                    return None
                storages = self._storages.setdefault(key, [])
            storage = torch.UntypedStorage(nbytes)
            storages.append(storage)
            self._held += nbytes
            return storage

    def release(self) -> int:
        """Drop the storage nothing else references; returns the bytes released."""
        with self._lock:
            return self._release_idle()

    def _release_idle(self) -> int:
        released = 0
        for key, storages in list(self._storages.items()):
            idle = [s for s in storages if _use_count is None or _use_count(s._cdata) == 1]
            for storage in idle:
                storages.remove(storage)
                released += key[1]
            if not storages:
                del self._storages[key]
        self._held -= released
        return released


OUTPUT_POOL = OutputPool()


def release_buffers() -> int:
    """Free the idle storage eqcore's fake quantizers keep for their outputs (bytes freed)."""
    return OUTPUT_POOL.release()
