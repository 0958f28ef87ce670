"""The fused CPU top-k ops (the whole route, and the selection alone) and the routers that
use them.

Checked against float64 routing computed here by hand (softmax of x @ W^T, a stable
descending sort for the top-k, renormalisation), against the routers' own PyTorch path,
and for the promises the serving chain builds on: rows independent of their batch mates
and of the thread count, ties to the lower index, every weight change seen, training
untouched, and a host without the op still routing.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from fused_op_build import needs_op
from fused_routes import grouped_router, pytorch_path, top_k_router

from moe_router.routing import (
    RouterConfig,
    ScoringFunction,
    TopKRouter,
    fused_topk,
)
from moe_router.routing.fused_topk import SelectionSpec
from moe_router.routing.output import LOGIT_BOUND


def _by_hand(x: torch.Tensor, weight: torch.Tensor, k: int, renormalize: bool, eps: float,
             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [T, k], weights [T, k], logits [T, E]) in float64, ties to the lower index."""
    logits = x.double() @ weight.double().T
    probs = logits.softmax(dim=-1)
    values, indices = probs.sort(dim=-1, descending=True, stable=True)
    values, indices = values[:, :k], indices[:, :k]
    if renormalize:
        values = values / (values.sum(dim=-1, keepdim=True) + eps)
    return indices, values * scale, logits


def _softmax_route(x: torch.Tensor, weight: torch.Tensor, k: int, renormalize: bool,
                   eps: float, scale: float, want_scores: bool = True,
                   load: torch.Tensor | None = None) -> fused_topk.FusedRoute:
    """The route op as the plain softmax top-k (Mixtral) calls it."""
    return fused_topk.topk_route(x, weight, None, None, k,
                                 SelectionSpec(renormalize=renormalize, eps=eps, scale=scale),
                                 want_scores, load)


@needs_op
def test_the_op_builds_on_a_host_with_a_compiler() -> None:
    assert fused_topk.kernel_available()


@needs_op
@pytest.mark.parametrize(("experts", "k", "dim"), [(2, 1, 16), (3, 2, 17), (8, 2, 4096),
                                                   (60, 4, 15), (128, 8, 64), (256, 8, 1)])
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("renormalize", [True, False])
def test_the_op_routes_as_float64_by_hand(experts: int, k: int, dim: int, tokens: int,
                                          renormalize: bool) -> None:
    gen = torch.Generator().manual_seed(experts * 1000 + tokens)
    x = torch.randn(tokens, dim, generator=gen)
    weight = torch.randn(experts, dim, generator=gen) / dim**0.5
    eps, scale = (1e-6, 2.5) if renormalize else (0.0, 1.0)
    got = _softmax_route(x, weight, k, renormalize, eps, scale)
    indices, weights, logits = _by_hand(x, weight, k, renormalize, eps, scale)
    assert got.indices.dtype == torch.int32 and got.num_per_token.dtype == torch.int32
    assert got.weights.dtype == got.logits.dtype == got.scores.dtype == torch.float32
    assert torch.equal(got.indices.long(), indices)
    torch.testing.assert_close(got.weights.double(), weights, rtol=0, atol=4e-6 * scale)
    torch.testing.assert_close(got.logits.double(), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.scores.double(), logits.softmax(-1), rtol=0, atol=1e-6)
    assert got.num_per_token.tolist() == [k] * tokens
    assert got.counts.dtype == torch.int64
    assert torch.equal(got.counts, torch.bincount(indices.reshape(-1), minlength=experts))


@needs_op
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_widened_exactly(dtype: torch.dtype) -> None:
    x = torch.randn(9, 48).to(dtype)
    weight = torch.randn(16, 48)
    narrow = _softmax_route(x, weight, 4, True, 0.0, 1.0)
    wide = _softmax_route(x.float(), weight, 4, True, 0.0, 1.0)
    for got, want in zip(narrow[:-1], wide[:-1], strict=True):
        assert torch.equal(got, want)  # bf16 / fp16 -> fp32 is exact: the same bits
    assert narrow.logits_bounded is wide.logits_bounded is True


@needs_op
def test_equal_scores_go_to_the_lower_index() -> None:
    # Experts 1, 3 and 6 share one gate row, 2 and 5 another: their scores tie exactly.
    weight = torch.randn(8, 32)
    weight[3] = weight[6] = weight[1]
    weight[5] = weight[2]
    x = torch.randn(50, 32)
    got = _softmax_route(x, weight, 5, True, 0.0, 1.0)
    indices, _, _ = _by_hand(x, weight, 5, True, 0.0, 1.0)
    assert torch.equal(got.indices.long(), indices)
    # A stable sort of the op's own probabilities gives the same order.
    stable = got.scores.sort(dim=-1, descending=True, stable=True).indices[:, :5]
    assert torch.equal(got.indices.long(), stable)


@needs_op
@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize(("experts", "dim"), [(8, 4096), (7, 45), (66, 300)])
def test_a_rows_answer_does_not_depend_on_its_batch_mates_or_the_threads(
        threads: int, experts: int, dim: int) -> None:
    """Alone a row is multiplied by itself; among 333 (tiles of up to 64 rows, blocks of
    up to six rows, experts in blocks of four and the rest) with others: the same bits,
    for hidden sizes with and without a partial last group of 16 columns."""
    weight = torch.randn(experts, dim) / dim**0.5
    batch = torch.randn(333, dim)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = _softmax_route(batch, weight, 2, True, 1e-20, 1.0)
        for row in (0, 1, 2, 3, 100, 330, 331, 332):
            alone = _softmax_route(batch[row : row + 1], weight, 2, True, 1e-20, 1.0)
            for got, want in zip(alone[:2] + alone[4:6], together[:2] + together[4:6],
                                 strict=True):
                assert torch.equal(got[0], want[row])
    finally:
        torch.set_num_threads(before)


@needs_op
@pytest.mark.parametrize("options", [{}, {"renormalize": False},
                                     {"routed_scaling_factor": 2.5, "renormalize_eps": 1e-6}])
def test_the_router_answers_as_its_pytorch_path(options: dict) -> None:
    router = top_k_router(dim=256, experts=16, k=4, **options)
    x = torch.randn(2, 5, 256)
    with torch.inference_mode():
        fused = router(x, return_losses=True)
        plain = pytorch_path(router, x, return_losses=True)
    assert torch.equal(fused.expert_indices, plain.expert_indices)
    assert fused.expert_indices.shape == (2, 5, 4) and fused.router_logits.shape == (2, 5, 16)
    assert torch.equal(fused.num_experts_per_token, plain.num_experts_per_token)
    assert torch.equal(fused.tokens_per_expert, plain.tokens_per_expert)
    torch.testing.assert_close(fused.expert_weights, plain.expert_weights, rtol=0, atol=2e-6)
    torch.testing.assert_close(fused.router_logits, plain.router_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.aux_loss, plain.aux_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.z_loss, plain.z_loss, rtol=1e-5, atol=1e-5)
    assert fused.dropped_tokens == 0 and fused.info == {}
    stats = router.get_stats()
    assert stats["total_batches"] == 2 and stats["total_tokens"] == 20
    assert stats["tokens_per_expert"] == (2 * plain.tokens_per_expert).tolist()


@needs_op
def test_the_op_adds_its_counts_into_the_load_from_threads_at_once() -> None:
    """The router's running expert load, added by the op with the GIL released: four
    threads routing 300 calls each into one load tensor lose no count."""
    weight = torch.randn(16, 64)
    calls = [torch.randn(1 + i % 5, 64) for i in range(300)]
    load = torch.zeros(16, dtype=torch.int64)
    expected = sum(_softmax_route(x, weight, 4, True, 0.0, 1.0, False).counts
                   for x in calls)

    def route_all() -> None:
        for x in calls:
            _softmax_route(x, weight, 4, True, 0.0, 1.0, False, load=load)

    threads = [threading.Thread(target=route_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(load, 4 * expected)
    with pytest.raises(RuntimeError, match="load: expected a contiguous int64 CPU"):
        _softmax_route(calls[0], weight, 4, True, 0.0, 1.0, False,
                                      load=torch.zeros(16, dtype=torch.int32))


@needs_op
def test_merged_calls_answer_what_each_call_alone_does() -> None:
    router = top_k_router(dim=128, experts=8)
    calls = [torch.randn(n, 128) for n in (1, 3, 16, 40)]
    with torch.inference_mode():
        merged = router.route_many(calls, return_losses=[False, True, False, True])
        alone = [router(c, return_losses=want) for c, want in zip(calls, [0, 1, 0, 1], strict=True)]
    for got, want in zip(merged, alone, strict=True):
        for name in ("expert_indices", "expert_weights", "router_logits", "tokens_per_expert"):
            assert torch.equal(getattr(got, name), getattr(want, name))
        assert (got.aux_loss is None) == (want.aux_loss is None)


@needs_op
@pytest.mark.parametrize("change", ["in_place", "load_state_dict", "new_parameter"])
def test_every_weight_change_shows_in_the_next_answer(change: str) -> None:
    router = top_k_router(dim=32, experts=6)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        before = router(x).router_logits
    replacement = torch.randn(6, 32)
    with torch.no_grad():
        if change == "in_place":
            router.gate.weight.mul_(-2.0)
        elif change == "load_state_dict":
            router.load_state_dict({**router.state_dict(), "gate.weight": replacement})
        else:
            router.gate.weight = torch.nn.Parameter(replacement)
    with torch.inference_mode():
        after = router(x).router_logits
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, x @ router.gate.weight.detach().T, rtol=1e-5, atol=1e-5)


def test_training_and_autograd_take_the_pytorch_path() -> None:
    router = top_k_router(dim=32, experts=6)
    x = torch.randn(4, 32)
    out = router(x)  # grad enabled: the logits carry the graph to the gate
    assert out.router_logits.requires_grad
    out.expert_weights.sum().backward()
    assert router.gate.weight.grad is not None
    router.train()
    with torch.no_grad():
        assert router(x, return_losses=True).aux_loss is not None


def test_the_router_still_routes_where_the_op_cannot_be_built(monkeypatch) -> None:
    router = top_k_router(dim=32, experts=6)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        want = pytorch_path(router, x)
    unavailable = fused_topk._Kernel()
    unavailable._tried = True  # as after a failed build
    monkeypatch.setattr(fused_topk, "_KERNEL", unavailable)
    assert not fused_topk.kernel_available()
    with torch.inference_mode():
        got = router(x)
    for name in ("expert_indices", "expert_weights", "router_logits", "tokens_per_expert"):
        assert torch.equal(getattr(got, name), getattr(want, name))


@needs_op
def test_the_whole_route_is_fused_where_the_gate_is_a_plain_linear_layer() -> None:
    fused = [
        top_k_router(), top_k_router(renormalize=False), top_k_router(routed_scaling_factor=2.0),
        top_k_router(scoring=ScoringFunction.SIGMOID),
        TopKRouter(RouterConfig(hidden_size=64, num_experts=8, top_k=2),
                   use_correction_bias=True).eval(),
        grouped_router(),
        top_k_router(gate_bias=True),
    ]
    selection_only = [top_k_router(logit_softcap=30.0), top_k_router(logit_multiplier=2.0)]
    torch_only = [top_k_router(capacity_factor=1.0), top_k_router(per_expert_scale=True)]
    x = torch.randn(3, 64)
    with torch.inference_mode():
        assert all(r._fused_gate(torch.randn(3, r.hidden_size)) is not None for r in fused)
        assert all(r._fused_gate(x) is None and r._selection_fusable for r in selection_only)
        assert all(r._fused_gate(x) is None and not r._selection_fusable for r in torch_only)
        assert fused[0]._fused_gate(x.to(torch.bfloat16)) is not None
    assert fused[0]._fused_gate(x) is None  # outside inference: autograd may want the graph


@needs_op
def test_the_amd_avx512_build_fuses_every_call_and_others_few_token_calls(one_row_at_once) -> None:
    """Built for AVX2 the op's matmul loses to the tuned one past a few tokens once the
    gate is wide (FEW_TOKENS); a router of at most FEW_EXPERTS experts is fused at every
    size."""
    wide = grouped_router(experts=64, scoring=ScoringFunction.SIGMOID)
    narrow = top_k_router(experts=fused_topk.FEW_EXPERTS)
    limit = fused_topk.FEW_TOKENS
    with torch.inference_mode():
        assert wide._fused_gate(torch.randn(limit, 32)) is not None
        assert wide._fused_gate(torch.randn(limit + 1, 32)) is None
        assert narrow._fused_gate(torch.randn(4096, 64)) is not None
        fused_topk._KERNEL.every_size = True  # as the AVX-512 build on an AMD CPU
        assert wide._fused_gate(torch.randn(4096, 32)) is not None


@needs_op
def test_non_finite_rows_answer_in_range_and_show_in_the_logits() -> None:
    weight = torch.randn(8, 16)
    x = torch.randn(3, 16)
    x[1, 4] = float("nan")
    x[2, 0] = float("inf")
    got = _softmax_route(x, weight, 2, True, 0.0, 1.0)
    assert ((got.indices >= 0) & (got.indices < 8)).all()
    assert (got.indices[:, 0] != got.indices[:, 1]).all()
    assert torch.isfinite(got.logits[0]).all() and not torch.isfinite(got.logits[1:]).all()
    assert int(got.counts.sum()) == 6


_LOGIT_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
                 "past the bound": 2e19, "negative past it": -2e19, "below it": 1e19}


@needs_op
@pytest.mark.parametrize("value", sorted(_LOGIT_VALUES))
@pytest.mark.parametrize("threads", [1, 4])
def test_the_ops_say_whether_every_logit_is_finite_and_below_the_bound(value: str,
                                                                       threads: int) -> None:
    """The verdict the serving chain takes instead of reading the logits again: one bad
    logit in any row of 300 (rows split between threads) makes the whole call's False.
    Through an identity gate, so the op's logits are the inputs."""
    bad = _LOGIT_VALUES[value]
    expected = abs(bad) < LOGIT_BOUND  # NaN compares False
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for row in (0, 150, 299):
            x = torch.randn(300, 8)
            x[row, 3] = bad
            route = _softmax_route(x, torch.eye(8), 2, True, 0.0, 1.0, False)
            others = torch.arange(300) != row  # (inf * 0 makes the bad row's others NaN)
            assert torch.equal(route.logits[others], x[others])
            assert route.logits_bounded is expected, (row, route.logits_bounded)
            selection = fused_topk.topk_select(
                x, None, 2, SelectionSpec(sigmoid=True))
            assert selection.logits_bounded is expected
        clean = torch.randn(300, 8)
        assert _softmax_route(clean, torch.eye(8), 2, True, 0.0, 1.0,
                                             False).logits_bounded is True
    finally:
        torch.set_num_threads(previous)


@needs_op
def test_the_routers_answer_carries_the_ops_verdict_and_none_without_it() -> None:
    x = torch.randn(5, 64)
    for router in (top_k_router(), top_k_router(scoring=ScoringFunction.SIGMOID)):
        with torch.inference_mode():
            assert router(x).logits_bounded is True
            x_bad = x.clone()
            x_bad[2, 1] = float("nan")
            assert router(x_bad).logits_bounded is False
            assert pytorch_path(router, x).logits_bounded is None  # not checked there
    assert top_k_router()(x).logits_bounded is None  # autograd on: the PyTorch path


@needs_op
@pytest.mark.parametrize("experts", [8, 64])  # 64: rows off the grid are copied onto it
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [4, 16, 36])
def test_an_input_off_the_64_byte_grid_answers_as_on_it(experts, dtype, offset) -> None:
    """A received message's rows rarely start on a 64-byte boundary; the op reads them
    there or copies them onto it, and the answer is the same to the bit."""
    weight = torch.randn(experts, 96)
    x = torch.randn(70, 96).to(dtype)  # two tiles and a tail at most sizes of L2
    raw = x.view(torch.uint8).numpy().tobytes()
    buffer = bytearray(offset + len(raw) + 64)
    start = offset + (-torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()) % 64
    buffer[start : start + len(raw)] = raw
    off_grid = torch.frombuffer(buffer, dtype=dtype, offset=start, count=x.numel()).view(70, 96)
    assert off_grid.data_ptr() % 64 == offset % 64 and torch.equal(off_grid, x)
    got, want = (_softmax_route(v, weight, 2, True, 0.0, 1.0) for v in (off_grid, x))
    for name in ("indices", "weights", "logits", "scores", "counts"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@needs_op
def test_a_strided_input_answers_as_its_contiguous_copy() -> None:
    router = top_k_router(dim=64, experts=8)
    wide = torch.randn(6, 128)
    strided = wide[:, ::2]  # every other column: a view that is not contiguous
    assert not strided.is_contiguous()
    with torch.inference_mode():
        got, want = router(strided), router(strided.contiguous())
    for name in ("expert_indices", "expert_weights", "router_logits", "tokens_per_expert"):
        assert torch.equal(getattr(got, name), getattr(want, name))


@needs_op
def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_process(tmp_path) -> None:
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from torch.utils import cpp_extension

    assert fused_topk.kernel_available()
    name, _ = fused_topk.library_name()
    built = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
    cache = tmp_path / name
    cache.mkdir()
    (cache / built.name).write_bytes(built.read_bytes())
    lock = cache / "lock"  # as a build killed an hour ago leaves it
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    done = subprocess.run(
        [sys.executable, "-c", "from moe_router.routing import fused_topk; "
                               "print(fused_topk.kernel_available())"],
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
        capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr
    assert "removing" in done.stderr and not lock.exists()


def _cpu_vendor() -> str:
    """This host's CPU vendor as the kernel reports it, read from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("vendor_id"):
            vendor = line.split(":", 1)[1].strip()
            return {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(vendor, "other")
    return "other"


@needs_op
@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads /proc/cpuinfo (Linux)")
def test_the_build_says_whether_its_matmul_serves_every_size() -> None:
    """Six rows at once on AVX-512, one on other builds; every call fused only on AMD's
    CPUs built for AVX-512 (on Intel's the library matmul wins past a few tokens)."""
    assert fused_topk.kernel_available()
    ops = fused_topk._ops()
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert ops.rows_at_once == (6 if avx512 else 1)
    assert ops.cpu_vendor == _cpu_vendor()
    assert fused_topk._KERNEL.every_size is (avx512 and ops.cpu_vendor == "amd")
    assert fused_topk._KERNEL.few_tokens == (
        fused_topk.FEW_TOKENS_SIX_ROWS if avx512 else fused_topk.FEW_TOKENS)
