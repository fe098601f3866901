"""pytest entry point: registers the easyquant option group."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("easyquant", "quantization regression suites (pytest-easyquant)")
