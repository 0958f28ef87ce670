"""``route_many`` answers every call bit for bit as ``forward`` on it alone.

Every per-token router kind, odd and even hidden dims, expert counts whose [T, E] is not
a multiple of the vector width, every input dtype, calls from 1 to 3000 tokens mixed at
random, with one torch intra-op thread (what the server runs with: ``intra_op_threads``)
and, for the structural parts, with the thread counts torch would pick. The causes these
guard against, each found by measurement here: elementwise kernels (sigmoid) computed a
call's last partial vector on a scalar path when its logits were selected as part of the
merged tensor; the BLAS gave different bits to a block that started 8 bytes past a
16-byte boundary; and with 4 threads it split one block's matmul between threads but gave
several blocks a thread each.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator

import pytest
import torch

from moe_router.routing import (
    DynamicRouter,
    GroupedTopKRouter,
    MLPTopKRouter,
    RouterConfig,
    ScoringFunction,
    TopKRouter,
)
from moe_router.routing import functional as F
from moe_router.routing.base import RouterBase

FIELDS = ("expert_indices", "expert_weights", "num_experts_per_token", "router_logits",
          "aux_loss", "z_loss", "tokens_per_expert", "complexity_scores")


def routers() -> dict[str, RouterBase]:
    torch.manual_seed(0)
    built: dict[str, RouterBase] = {
        "top_k softmax, D 4096": TopKRouter(
            RouterConfig(hidden_size=4096, num_experts=8, top_k=2, renormalize=True)),
        "top_k sigmoid, D 33, E 12": TopKRouter(RouterConfig(
            hidden_size=33, num_experts=12, top_k=3, scoring=ScoringFunction.SIGMOID,
            renormalize=True)),
        "grouped, D 32, E 16": GroupedTopKRouter(RouterConfig(
            hidden_size=32, num_experts=16, top_k=4, n_group=4, topk_group=2,
            scoring=ScoringFunction.SIGMOID), use_correction_bias=True),
        "grouped DeepSeek-like, D 65, E 24": GroupedTopKRouter(RouterConfig(
            hidden_size=65, num_experts=24, top_k=4, n_group=4, topk_group=2,
            scoring=ScoringFunction.SIGMOID, renormalize=True, routed_scaling_factor=2.5),
            use_correction_bias=True),
        # 32 experts or more: every block multiplies by the gate's contiguous copy.
        "top_k softmax, D 96, E 64": TopKRouter(
            RouterConfig(hidden_size=96, num_experts=64, top_k=6, renormalize=True)),
        "grouped, D 80, E 256": GroupedTopKRouter(RouterConfig(
            hidden_size=80, num_experts=256, top_k=8, n_group=8, topk_group=4,
            scoring=ScoringFunction.SIGMOID, renormalize=True, routed_scaling_factor=2.5),
            use_correction_bias=True),
        "moe_router MLP, D 97": MLPTopKRouter(
            RouterConfig(hidden_size=97, num_experts=12, top_k=2), hidden_layers=[33]),
        "dynamic threshold": DynamicRouter(
            48, 8, 1, 4, complexity_estimator="threshold", load_balancing=False),
    }
    with torch.no_grad():
        for router in built.values():
            router.eval()
            bias = getattr(router, "e_score_correction_bias", None)
            if bias is not None:
                bias.uniform_(-0.1, 0.1)
    assert not any(r.couples_tokens_now or r.stateful or r.stochastic for r in built.values())
    return built


ROUTERS = routers()
SIZES = (1, 2, 3, 5, 7, 16, 31, 48, 64, 100, 129, 256, 300, 777, 3000)


def mixes(seed: int, count: int) -> Iterator[tuple[torch.dtype, list[int]]]:
    rng = random.Random(seed)
    for _ in range(count):
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        yield dtype, [rng.choice(SIZES) for _ in range(rng.randint(2, 6))]


def assert_each_as_alone(router: RouterBase, calls: list[torch.Tensor]) -> None:
    with torch.inference_mode():
        merged = router.route_many(calls)
        for i, (x, many) in enumerate(zip(calls, merged, strict=True)):
            alone = router(x)
            for name in FIELDS:
                expected, got = getattr(alone, name), getattr(many, name)
                if expected is None:
                    assert got is None, name
                    continue
                assert torch.equal(expected, got), (
                    f"call {i} of {[c.shape[0] for c in calls]}: {name} differs")


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_route_many_is_bit_identical_to_alone_with_one_thread(name, one_thread):
    router = ROUTERS[name]
    for dtype, sizes in mixes(seed=zlib.crc32(name.encode()), count=25):
        g = torch.Generator().manual_seed(sum(sizes))
        calls = [torch.randn(n, router.hidden_size, generator=g).to(dtype) for n in sizes]
        assert_each_as_alone(router, calls)


def test_three_d_calls_keep_their_shape_and_bits(one_thread):
    router = ROUTERS["grouped, D 32, E 16"]
    g = torch.Generator().manual_seed(3)
    calls = [torch.randn(2, 3, 32, generator=g), torch.randn(5, 32, generator=g),
             torch.randn(1, 7, 32, generator=g)]
    assert_each_as_alone(router, calls)


@pytest.mark.parametrize("threads", [1, 2])
def test_selection_runs_on_each_calls_own_logits_at_any_thread_count(threads):
    """The 16-expert sigmoid router differed in 22 of 100 mixes, at one thread as at two,
    when the selection ran on the merged logits (its sigmoid's scalar tail)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        router = ROUTERS["grouped, D 32, E 16"]
        for _, sizes in mixes(seed=7, count=30):
            g = torch.Generator().manual_seed(len(sizes))
            assert_each_as_alone(router, [torch.randn(n, 32, generator=g) for n in sizes])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dim", [33, 65, 4097])
def test_blocks_start_on_64_byte_boundaries_among_other_calls(dim, one_thread):
    """Two-row blocks of an odd dim start 8 bytes off a 16-byte boundary in a plain
    concatenation; their products then differed from the same block alone."""
    g = torch.Generator().manual_seed(dim)
    weight = torch.randn(8, dim, generator=g)
    x = torch.randn(2, dim, generator=g)
    alone = F.batch_invariant_linear(x, weight, block_rows=2)
    for before in range(1, 8):
        merged = torch.cat([torch.randn(2 * before, dim, generator=g), x])
        out = F.batch_invariant_linear(merged, weight, block_rows=2)[-2:]
        assert torch.equal(out, alone), f"block {before} of {before + 1}"
    blocks = F._aligned_blocks(torch.randn(6, dim), 2)
    assert all(blocks[i].data_ptr() % 64 == 0 for i in range(blocks.shape[0]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_route_many_is_bit_identical_to_alone_on_cuda(name):
    router = routers()[name].to("cuda")
    for dtype, sizes in mixes(seed=11, count=15):
        g = torch.Generator().manual_seed(sum(sizes))
        calls = [torch.randn(n, router.hidden_size, generator=g).to(dtype).cuda()
                 for n in sizes]
        assert_each_as_alone(router, calls)
