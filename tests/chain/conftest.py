"""Fixtures of the chain tests."""

from __future__ import annotations

import pytest
from chain_backends import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
