"""Fake quantization: the functional numerics, its kernels, the modules, observers, toggles and recipes."""
