"""Fixtures of the routing tests."""

from __future__ import annotations

import pytest

from moe_router.routing import fused_topk


@pytest.fixture
def one_row_at_once(monkeypatch):
    """The op as an AVX2 build has it (one row at a time), whatever this host built."""
    assert fused_topk.kernel_available()
    monkeypatch.setattr(fused_topk._KERNEL, "every_size", False)
    monkeypatch.setattr(fused_topk._KERNEL, "few_tokens", fused_topk.FEW_TOKENS)
