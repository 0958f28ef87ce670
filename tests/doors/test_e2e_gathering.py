"""Concurrent 1-token calls share passes over real gRPC, through Route and through the
Open Inference Protocol's ModelInfer (the batcher's gathering).

Before, each call of a few tokens that found the device idle took a pass on the event
loop alone, however many callers waited behind it (16 callers: one pass per call). Now
the calls on their way join it, where a pass costs more than sharing it: checked here
with DeepSeek-V3's gate (256 x 7168, 7 MB; a 1-token pass takes hundreds of
microseconds), whose 1-token calls the fused op routes, stacked into one op call
(answers bit-identical to routing each call alone in-process). ModelInfer calls that
arrive together share passes the same way; that the door also reports the calls it is
still reading (which catches closed-loop callers arriving one by one) is checked in
test_oip_convert.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from inprocess_server import serve_in_process
from oip_calls import infer_input
from server_process import write_config

from moe_router.config import load_config
from moe_router.loading.registry import load_routers
from moe_router_client import AsyncRouterClient

WIDE = {
    "name": "wide",
    "kind": "grouped_top_k",
    "input_dim": 7168,
    "num_experts": 256,
    "top_k": 8,
    "n_group": 8,
    "topk_group": 4,
    "scoring": "sigmoid",
    "group_score": "top2_sum",
    "use_correction_bias": True,
    "routed_scaling_factor": 2.5,
    "weights": {"init": "random", "seed": 5},
}
CALLERS = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """Passes of a few tokens on the loop (the default inline budget), no cache."""
    config = write_config(tmp_path_factory.mktemp("gather") / "config.yaml", [WIDE],
                          batching={"max_queue_delay_us": 20000}, cache={"enabled": False})
    hosted = load_routers(load_config(config, env={}))
    with serve_in_process(config) as server:
        yield server, hosted


def _rounds(seed: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal((1, 7168), dtype=np.float32) for _ in range(CALLERS)]
            for _ in range(8)]


def _check(hosted, x: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> None:
    """The answer routing ``x`` alone in-process gives, bit for bit."""
    with torch.inference_mode():
        alone = hosted["wide"].layers[0](torch.from_numpy(x))
    np.testing.assert_array_equal(indices, alone.expert_indices.numpy())
    np.testing.assert_array_equal(weights, alone.expert_weights.numpy())


def test_sixteen_callers_of_one_token_share_passes_bit_identically(served) -> None:
    server, hosted = served
    rounds = _rounds(7)

    async def fire():
        async with AsyncRouterClient(server.target, timeout=30) as client:
            for x in rounds[0]:  # each pass size measured, so later passes run on the loop
                await client.route("wide", x)
            answers = []
            for inputs in rounds:
                answers.append(await asyncio.gather(*(client.route("wide", x) for x in inputs)))
            return answers

    answers = asyncio.run(fire())
    merged = 0
    for inputs, results in zip(rounds, answers, strict=True):
        for x, result in zip(inputs, results, strict=True):
            _check(hosted, x, result.expert_indices, result.expert_weights)
            if result.info.batch_requests > 1:
                merged += 1
                assert result.info.batch_tokens == result.info.batch_requests
    assert merged >= CALLERS, f"only {merged} of {8 * CALLERS} calls shared a pass"


def test_sixteen_tritonclient_callers_share_passes_bit_identically(served) -> None:
    server, hosted = served
    rounds = _rounds(11)

    async def infer(client: triton_aio.InferenceServerClient, x: np.ndarray):
        tensor = infer_input(triton, "hidden_states", x, "FP32")
        return await client.infer("wide", [tensor], client_timeout=30)

    async def caller(client: triton_aio.InferenceServerClient, inputs: list[np.ndarray]):
        return [await infer(client, x) for x in inputs]  # closed loop, as a serving stack

    async def fire():
        clients = [triton_aio.InferenceServerClient(server.target) for _ in range(CALLERS)]
        try:
            for client, x in zip(clients, rounds[0], strict=True):  # sizes measured first
                await infer(client, x)
            per_caller = await asyncio.gather(*(
                caller(c, [inputs[i] for inputs in rounds]) for i, c in enumerate(clients)))
            return [list(answers) for answers in zip(*per_caller, strict=True)]
        finally:
            for client in clients:
                await client.close()

    answers = asyncio.run(fire())
    merged = 0
    for inputs, results in zip(rounds, answers, strict=True):
        for x, result in zip(inputs, results, strict=True):
            _check(hosted, x, result.as_numpy("expert_indices"),
                   result.as_numpy("expert_weights"))
            if result.get_response().parameters["batch_requests"].int64_param > 1:
                merged += 1
    assert merged >= CALLERS, f"only {merged} of {8 * CALLERS} calls shared a pass"
