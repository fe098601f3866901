"""Which CPU kernels torch runs, and pinning them so baselines compare across x86-64 machines.

Float results differ in their last bits between kernels (ATen's AVX-512 or AVX2 code, oneDNN's
convolutions, MKL's GEMMs), and a quantized model turns such differences into rounding flips that
grow layer by layer. ``describe()`` names the kernels for the baseline metadata; ``pin()`` (the
``--eq-pin-kernels`` option) sets the three libraries' variables to AVX2, which each reads once, at
its first use, and checks that ATen took them.
"""

from __future__ import annotations

import os

PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
"""The environment that gives every x86-64 CPU with AVX2 the same kernels (README, "Baselines across machines")."""

_LABELS = (("ONEDNN_MAX_CPU_ISA", "oneDNN"), ("MKL_CBWR", "MKL"))


def describe() -> str:
    """ATen's instruction set (``AVX2``, ``AVX512``, ...; it follows ``ATEN_CPU_CAPABILITY``), then
    any pin of oneDNN's and MKL's paths, e.g. ``AVX2, oneDNN AVX2, MKL AVX2``."""
    import torch

    pins = [f"{label} {os.environ[name]}" for name, label in _LABELS if os.environ.get(name)]
    return ", ".join([torch.backends.cpu.get_cpu_capability(), *pins])


def pin(where: str) -> None:
    """Set ``PINS`` in this process's environment (inherited by xdist workers), then make ATen
    choose its kernels; a ``ValueError`` naming ``where`` says what to do when that cannot work."""
    clashing = [f"{name}={os.environ[name]}" for name, value in PINS.items() if os.environ.get(name, value) != value]
    if clashing:
        raise ValueError(f"{where} pins {_assignments()}, but the environment sets {' '.join(clashing)}: unset it")
    os.environ.update(PINS)
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        raise ValueError(
            f"{where}: torch runs {capability} kernels, not AVX2. Either this CPU lacks AVX2 (then record "
            "and compare baselines on one machine), or a tensor op ran before pytest configured the "
            f"plugin (then set {_assignments()} in the environment instead)"
        )


def _assignments() -> str:
    return " ".join(f"{name}={value}" for name, value in PINS.items())
