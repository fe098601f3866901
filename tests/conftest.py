"""Shared test configuration: a derandomized hypothesis profile for CI."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Under pytest-xdist every worker is a process: one torch thread each keeps the cores from being
# oversubscribed (OpenMP threads that wait for a descheduled peer make small ops 50x slower).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))

# torch.export's first call imports inductor's caches, which register themselves once per process.
# pytester's in-process sessions drop the modules first imported inside them, so a later import
# would register them again and fail: import them here, before any such session.
import torch._functorch.aot_autograd  # noqa: E402, F401
import torch.export._trace  # noqa: E402, F401
