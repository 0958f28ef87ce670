"""Calls a second, calls a device pass and refusals of closed-loop tritonclient callers of
a running server's Open Inference Protocol door (ModelInfer), read from its /metrics.

    python scripts/measure_oip_batching.py TARGET METRICS_PORT [--router deepseek-v3]
        [--dim 7168] [--tokens 1] [--callers 16] [--seconds 5]

Each caller sends its next call when its answer is back, as a serving stack does, so the
calls reach the server one by one: what the batcher's gathering has to catch. The calls
a pass are the change of ``moe_router_batch_size_requests`` (sum over count) for the
router over the timed window; a call that fails is counted by its status code (the
callers go on). Run it against two servers in turn (the code before and
after a change, e.g. a ``git worktree`` on ``PYTHONPATH``) to compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import time
import urllib.request

import numpy as np
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException


def batch_figures(metrics_port: int, router: str) -> tuple[float, float]:
    """(calls, passes) the batcher of ``router`` has counted so far."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    figures = []
    for series in ("sum", "count"):
        pattern = rf'moe_router_batch_size_requests_{series}{{router="{re.escape(router)}"}} (\S+)'
        found = re.search(pattern, text)
        figures.append(float(found.group(1)) if found else 0.0)
    return figures[0], figures[1]


async def closed_loop(
    args: argparse.Namespace,
) -> tuple[collections.Counter[str], float, float, float]:
    """Run the callers for ``args.seconds``; (calls by outcome, seconds, and the calls and
    passes the batcher counted meanwhile)."""
    x = np.random.default_rng(0).standard_normal((args.tokens, args.dim), dtype=np.float32)
    tensor = triton.InferInput("hidden_states", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    clients = [triton_aio.InferenceServerClient(args.target) for _ in range(args.callers)]
    outcomes: collections.Counter[str] = collections.Counter()
    try:
        for client in clients:  # warm: connections up, pass sizes measured
            await client.infer(args.router, [tensor])
        calls_before, passes_before = batch_figures(args.metrics_port, args.router)
        started = time.perf_counter()
        end = started + args.seconds

        async def caller(client: triton_aio.InferenceServerClient) -> None:
            while time.perf_counter() < end:
                try:
                    await client.infer(args.router, [tensor])
                    outcomes["OK"] += 1
                except InferenceServerException as exc:  # "StatusCode.RESOURCE_EXHAUSTED"
                    outcomes[str(exc.status()).rpartition(".")[2]] += 1

        await asyncio.gather(*(caller(client) for client in clients))
        seconds = time.perf_counter() - started
        calls, passes = batch_figures(args.metrics_port, args.router)
        return outcomes, seconds, calls - calls_before, passes - passes_before
    finally:
        for client in clients:
            await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="the server's gRPC address, host:port")
    parser.add_argument("metrics_port", type=int, help="its metrics port (metrics.port)")
    parser.add_argument("--router", default="deepseek-v3")
    parser.add_argument("--dim", type=int, default=7168, help="the router's input_dim")
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    outcomes, seconds, calls, passes = asyncio.run(closed_loop(args))
    refused = {code: n for code, n in outcomes.items() if code != "OK"}
    print(f"{args.router} T={args.tokens} {args.callers} callers: "
          f"{outcomes['OK'] / seconds:,.0f} calls/s; {calls:.0f} calls in {passes:.0f} "
          f"passes ({calls / max(passes, 1):.2f} a pass); failed: {refused or 'none'}")


if __name__ == "__main__":
    main()
