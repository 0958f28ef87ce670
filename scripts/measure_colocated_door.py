"""Round trip of the co-located door against the same routing in-process and over gRPC.

    python scripts/measure_colocated_door.py [--calls 300]

Starts ``moe-router serve`` (the default config's ``mixtral``: 4096 wide, 8 experts,
top-2, CPU) in a child process, then times closed-loop calls from here, p50 in
microseconds, each case side by side with our router called in this process on the same
weights: 1 token fp32 (through the input region, and inline in the control message), and
2048 x 4096 bf16. The paths are called in turn, round after round, so that each sees the
same load. ``skip_cache`` on every call, so each one routes.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from moe_router.config import load_config
from moe_router.loading.registry import load_routers
from moe_router_client import CoLocatedClient, RouterClient

CONFIG = {
    "server": {"host": "127.0.0.1", "port": 0, "device": "cpu"},
    "metrics": {"enabled": False},
    "health": {"enabled": False},
    "routers": [{"name": "mixtral", "kind": "top_k", "input_dim": 4096, "num_experts": 8,
                 "top_k": 2, "layers": 1, "weights": {"init": "random", "seed": 0}}],
}


def interleaved_p50_us(calls: list[Callable[[], object]], rounds: int) -> list[float]:
    """p50 of each callable, called in turn round after round (so that every one sees
    the same load on a shared machine)."""
    for _ in range(max(5, rounds // 10)):
        for call in calls:
            call()
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for call, times in zip(calls, samples, strict=True):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e6)
    return [statistics.median(times) for times in samples]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(CONFIG))
        router = load_routers(load_config(path, env={}))["mixtral"].layers[0]
        server = subprocess.Popen([sys.executable, "-m", "moe_router", "serve", "--config",
                                   str(path)], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert server.stdout is not None
            for line in server.stdout:
                found = re.search(r"listening on ([\d.]+):(\d+)", line)
                if found:
                    target = f"{found.group(1)}:{found.group(2)}"
                    break
            cases = [("1 x 4096 fp32", torch.randn(1, 4096)),
                     ("2048 x 4096 bf16", torch.randn(2048, 4096).bfloat16())]
            print(f"{'case':<18} {'in-process':>11} {'door':>9} {'door/inline':>12} "
                  f"{'gRPC':>9}   p50 us, {args.calls} calls each")
            with CoLocatedClient(target) as door, \
                    CoLocatedClient(target, inline_limit=1 << 16) as inline, \
                    RouterClient(target) as grpc_client:
                assert door.transport == "colocated"
                for name, x in cases:
                    rounds = args.calls if x.shape[0] == 1 else max(20, args.calls // 10)

                    def local(x: torch.Tensor = x) -> object:
                        with torch.inference_mode():
                            return router(x)

                    paths = [local] + [
                        lambda c=c, x=x: c.route("mixtral", x, skip_cache=True)
                        for c in (door, inline, grpc_client)
                    ]
                    figures = interleaved_p50_us(paths, rounds)
                    print(f"{name:<18} {figures[0]:11.0f} {figures[1]:9.0f} {figures[2]:12.0f} "
                          f"{figures[3]:9.0f}")
        finally:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
