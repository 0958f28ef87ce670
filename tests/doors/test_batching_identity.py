"""Batching is bit-identical against a real `moe-router serve` process under concurrency.

Every batchable router kind (odd dims and expert counts whose tails and alignment once
changed the last bits), shape mixes drawn at random, several concurrent callers per
round and all routers at once (their passes run in parallel in the device pool); each
answer — indices, weights, counts, logits, losses, complexity — is compared with the
same call routed alone through the same server afterwards. The server runs with its
real thread setting (``server.intra_op_threads: 1``); with more threads it must not merge.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from server_process import start_server, write_config

from moe_router_client import AsyncRouterClient, RouterClient

ROUTERS = [
    {"name": "top-k", "kind": "top_k", "input_dim": 64, "num_experts": 8, "top_k": 2,
     "renormalize": True, "layers": 2, "weights": {"init": "random", "seed": 1}},
    {"name": "sigmoid", "kind": "top_k", "input_dim": 33, "num_experts": 12, "top_k": 3,
     "scoring": "sigmoid", "renormalize": True, "weights": {"init": "random", "seed": 2}},
    {"name": "grouped", "kind": "grouped_top_k", "input_dim": 65, "num_experts": 24,
     "top_k": 4, "n_group": 4, "topk_group": 2, "scoring": "sigmoid",
     "group_score": "top2_sum", "use_correction_bias": True, "routed_scaling_factor": 2.5,
     "weights": {"init": "random", "seed": 3}},
    {"name": "mlp", "kind": "moe_router", "input_dim": 97, "num_experts": 12, "top_k": 2,
     "hidden_layers": [33], "weights": {"init": "random", "seed": 4}},
    {"name": "dynamic", "kind": "dynamic", "input_dim": 48, "num_experts": 8,
     "min_experts": 1, "max_experts": 4, "complexity_estimator": "threshold",
     "load_balancing": False, "weights": {"init": "random", "seed": 5}},
]
SIZES = (1, 2, 3, 5, 7, 16, 31, 48, 64, 100, 129, 256, 300)
PACER_TOKENS = 3000
DTYPES = (np.float32, np.float16, ml_dtypes.bfloat16)
FIELDS = ("expert_indices", "expert_weights", "num_experts_per_token", "router_logits",
          "complexity_scores")


def config(tmp_path: Path, threads: int) -> Path:
    return write_config(
        tmp_path / f"batching-{threads}.yaml", ROUTERS, cache={"enabled": False},
        batching={"max_queue_delay_us": 20000, "inline_max_us": 0},
        server={"intra_op_threads": threads, "max_workers": 2},
    )


def same(a, b) -> bool:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y)):
            return False
    return (a.info.aux_loss, a.info.z_loss, a.info.tokens_per_expert) == (
        b.info.aux_loss, b.info.z_loss, b.info.tokens_per_expert)


def rounds(seed: int, count: int):
    rng = random.Random(seed)
    dims = {r["name"]: r["input_dim"] for r in ROUTERS}
    for _ in range(count):
        calls = []
        for name, dim in dims.items():
            dtype = rng.choice(DTYPES)
            layer = rng.choice([0, 1]) if name == "top-k" else 0
            for i in range(rng.randint(4, 8)):
                # The first call of each router is large: its pass keeps the device busy
                # while the others arrive, so they gather and share the next pass.
                shape = (PACER_TOKENS if i == 0 else rng.choice(SIZES), dim)
                if i and rng.random() < 0.2:
                    shape = (2, *shape)
                x = np.random.default_rng(rng.randrange(1 << 30)).standard_normal(shape)
                calls.append((name, layer, x.astype(np.float32).astype(dtype)))
        yield calls


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    process = start_server(config(tmp_path_factory.mktemp("batching"), threads=1))
    yield process
    process.terminate()


def test_every_merged_answer_equals_the_same_call_routed_alone(server):
    async def scenario() -> tuple[int, int, list[str]]:
        merged = total = 0
        differ: list[str] = []
        async with AsyncRouterClient(server.target, timeout=60) as client:
            for calls in rounds(seed=1, count=8):
                # Up to 40 calls at once: admitted, 16 read at a time (MAX_READERS)
                together = await asyncio.gather(*(
                    client.route(name, x, layer, return_router_logits=True)
                    for name, layer, x in calls))
                for (name, layer, x), answer in zip(calls, together, strict=True):
                    alone = await client.route(name, x, layer, return_router_logits=True)
                    assert alone.info.batch_requests == 1
                    total += 1
                    merged += answer.info.batch_requests > 1
                    if not same(answer, alone):
                        differ.append(f"{name} {x.shape} {x.dtype} with "
                                      f"{answer.info.batch_requests} calls")
        return merged, total, differ

    merged, total, differ = asyncio.run(scenario())
    print(f"{merged} of {total} answers came from merged passes; all equal to alone")
    assert not differ, f"{len(differ)} of {total} answers differ: {differ[:5]}"
    assert merged > total // 6, f"only {merged} of {total} answers came from merged passes"


def test_every_batchable_router_reports_that_it_batches(server):
    with RouterClient(server.target, timeout=10) as client:
        described = {r.name: r.batches_across_requests for r in client.list_routers()}
    assert described == {r["name"]: True for r in ROUTERS}


def test_with_more_intra_op_threads_a_cpu_server_does_not_merge(tmp_path: Path):
    process = start_server(config(tmp_path, threads=2))
    try:
        with RouterClient(process.target, timeout=10) as client:
            assert not any(r.batches_across_requests for r in client.list_routers())

        async def fire():
            async with AsyncRouterClient(process.target, timeout=60) as client:
                x = np.ones((3, 64), np.float32)
                return await asyncio.gather(*(client.route("top-k", x) for _ in range(8)))

        assert {r.info.batch_requests for r in asyncio.run(fire())} == {1}
    finally:
        process.terminate()
