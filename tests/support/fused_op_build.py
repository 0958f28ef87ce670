"""Whether this host can build the fused CPU top-k ops, as a pytest mark."""

from __future__ import annotations

import shutil

import pytest

needs_op = pytest.mark.skipif(
    (shutil.which("c++") is None and shutil.which("g++") is None) or shutil.which("ninja") is None,
    reason="no C++ compiler or no ninja on PATH: the ops cannot be built here (the routers "
           "use PyTorch ops; `make test` puts the venv's ninja on PATH)",
)
