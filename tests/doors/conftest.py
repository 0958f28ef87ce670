"""Fixtures of the doors tests."""

from __future__ import annotations

import pytest
from chain_backends import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def oip_server(tmp_path_factory: pytest.TempPathFactory):
    """One `moe-router serve` for the Open Inference Protocol tests: every router kind,
    the default cache, `mixtral-wait`, a copy of `mixtral` whose batcher holds calls up
    to 50 ms so that concurrent calls meet, and `dynamic-logits`, a stateless dynamic
    router (no load balancing, perplexity from the caller's logits) whose answers can be
    compared call for call."""
    from server_process import small_routers, start_server, write_config

    tmp = tmp_path_factory.mktemp("oip")
    routers = small_routers()
    mixtral = next(r for r in routers if r["name"] == "mixtral")
    routers.append({**mixtral, "name": "mixtral-wait", "batching": {"max_queue_delay_us": 50000,
                                                                    "inline_max_us": 0}})
    dynamic = next(r for r in routers if r["name"] == "dynamic")
    routers.append({**dynamic, "name": "dynamic-logits", "load_balancing": False,
                    "complexity_estimator": "perplexity_proxy"})
    server = start_server(write_config(tmp / "config.yaml", routers))
    yield server
    server.terminate()
