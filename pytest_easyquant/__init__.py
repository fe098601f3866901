"""pytest-easyquant: quantization regression suites for pytest."""

__version__ = "0.1.0"
