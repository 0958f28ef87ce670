"""The Open Inference Protocol door through unmodified `tritonclient.grpc.aio` against a
real `moe-router serve`: every call of the sync tests' kinds, concurrent calls batched
bit-identically, and streams."""

from __future__ import annotations

import asyncio

import pytest
import torch
from oip_calls import CORE, assert_same_bits, hidden, infer_input, route_outputs

from moe_router.config import load_config
from moe_router.loading.registry import load_routers
from moe_router_client import AsyncRouterClient

aio = pytest.importorskip("tritonclient.grpc.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402


def run(coroutine_function, oip_server):
    """Run ``coroutine_function(triton_client, router_client)`` on a fresh event loop."""

    async def main():
        async with aio.InferenceServerClient(oip_server.target) as triton:
            async with AsyncRouterClient(oip_server.target, timeout=30) as router:
                return await coroutine_function(triton, router)

    return asyncio.run(main())


def test_health_and_metadata(oip_server):
    async def calls(triton, _):
        return (
            await triton.is_server_live(),
            await triton.is_server_ready(),
            await triton.is_model_ready("deepseek"),
            await triton.is_model_ready("no-such-router"),
            await triton.get_server_metadata(),
            await triton.get_model_metadata("deepseek"),  # 32-dim, top-4 of 16
        )

    live, ready, known, unknown, server, model = run(calls, oip_server)
    assert live and ready and known and not unknown
    assert server.name == "moe-router"
    assert [(t.name, list(t.shape)) for t in model.inputs] == [("hidden_states", [-1, 32])]
    assert {t.name: list(t.shape) for t in model.outputs}["expert_weights"] == [-1, 4]


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16"])
def test_infer_in_each_dtype_equals_route(oip_server, datatype):
    x = hidden((5, 32), datatype, seed=40)

    async def calls(triton, router):
        answer = await triton.infer(
            "deepseek", [infer_input(aio, "hidden_states", x, datatype)],
            parameters={"skip_cache": True},
        )
        reference = await router.route("deepseek", x, return_router_logits=True, skip_cache=True)
        return answer, reference

    answer, reference = run(calls, oip_server)
    for name, value in route_outputs(reference).items():
        assert_same_bits(answer.as_numpy(name), value, name)


def test_a_bad_input_is_invalid_argument(oip_server):
    async def calls(triton, _):
        with pytest.raises(InferenceServerException) as raised:
            await triton.infer("deepseek", [infer_input(aio, "hidden_states",
                                                         hidden((2, 31)), "FP32")])
        return raised.value

    error = run(calls, oip_server)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "31" in error.message()


def oip_server_config(oip_server):
    """The config.yaml the session's server runs (its command line names it)."""
    args = oip_server.proc.args
    return args[args.index("--config") + 1]


def test_concurrent_calls_are_batched_and_equal_the_router_in_process(oip_server):
    """`mixtral-wait` holds calls up to 50 ms while a pass runs: concurrent OIP calls
    share device passes, and each answer is the one the router gives that call alone.
    A call only waits for company while a pass is running, and a pass of a few tokens
    takes microseconds (the fused CPU op), less than the client takes to send the next
    call: so the first call is a large one whose pass keeps the device busy while the
    47 small ones arrive (without it, one run in four merged nothing)."""
    inputs = [hidden((30_000 if i == 0 else 1 + i % 4, 64), seed=50 + i) for i in range(48)]
    outputs = [aio.InferRequestedOutput(n) for n in CORE]

    async def calls(triton, _):
        return await asyncio.gather(*(
            triton.infer("mixtral-wait", [infer_input(aio, "hidden_states", x, "FP32")],
                         outputs=outputs)
            for x in inputs
        ))

    answers = run(calls, oip_server)
    hosted = load_routers(load_config(oip_server_config(oip_server), env={}))
    router = hosted["mixtral-wait"].layers[0]
    for x, answer in zip(inputs, answers, strict=True):
        with torch.inference_mode():
            alone = router(torch.from_numpy(x))
        assert_same_bits(answer.as_numpy("expert_indices"), alone.expert_indices.numpy())
        assert_same_bits(answer.as_numpy("expert_weights"), alone.expert_weights.numpy())
    merged = [a.get_response().parameters["batch_requests"].int64_param for a in answers]
    assert max(merged) > 1, "no calls were merged"


def test_stream_infer_answers_in_order(oip_server):
    inputs = [hidden((2 + i, 32), seed=60 + i) for i in range(6)]

    async def requests():
        for i, x in enumerate(inputs):
            yield {
                "model_name": "deepseek" if i != 3 else "deepseek/9",
                "inputs": [infer_input(aio, "hidden_states", x, "FP32")],
                "request_id": f"a{i}",
            }

    async def calls(triton, router):
        received = [item async for item in triton.stream_infer(requests())]
        references = [await router.route("deepseek", x) for x in inputs]
        return received, references

    received, references = run(calls, oip_server)
    assert len(received) == len(inputs)
    for i, ((result, error), reference) in enumerate(zip(received, references, strict=True)):
        if i == 3:
            assert result is None and "has no layer 9" in error.message()
            continue
        assert error is None and result.get_response().id == f"a{i}"
        assert_same_bits(result.as_numpy("expert_indices"), reference.expert_indices)


def test_statistics_count_each_call(oip_server):
    x = hidden((3, 32), seed=70)

    async def calls(triton, _):
        before = await triton.get_inference_statistics("deepseek")
        await triton.infer("deepseek", [infer_input(aio, "hidden_states", x, "FP32")],
                           parameters={"skip_cache": True})
        return before, await triton.get_inference_statistics("deepseek")

    before, after = (r.model_stats[0] for r in run(calls, oip_server))
    assert after.name == "deepseek"
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_count == before.inference_count + 3
