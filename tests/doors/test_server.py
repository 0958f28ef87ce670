"""create_server's assembly, in-process: options, ports, chains, metrics, health, stop."""

from __future__ import annotations

import asyncio
import re
import socket
import textwrap
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from server_process import small_routers, start_server, write_config

from moe_router.config import load_config
from moe_router.doors.server import create_server, grpc_server_options
from moe_router_client import RouterClient
from moe_router_client.v1 import router_pb2 as pb
from moe_router_client.v1 import router_pb2_grpc as pb_grpc

CONFIG = """\
server: {host: 127.0.0.1, port: 0, device: cpu, max_message_bytes: 1048576}
metrics: {host: 127.0.0.1, port: 0}
health: {host: 127.0.0.1, port: 0}
routers:
  - {name: a, kind: top_k, input_dim: 8, num_experts: 4, top_k: 2, layers: 2}
  - {name: b, kind: soft_moe, input_dim: 8, num_experts: 2}
"""


def _config(tmp_path: Path, text: str = CONFIG, **overrides):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(path, env={}, overrides=overrides)


def test_server_options_correct_grpc_defaults(tmp_path: Path) -> None:
    options = dict(grpc_server_options(_config(tmp_path)))
    assert options["grpc.so_reuseport"] == 0
    assert options["grpc.max_receive_message_length"] == 1048576
    assert options["grpc.max_send_message_length"] == 1048576
    assert options["grpc.max_connection_age_ms"] > 0
    # No BDP probing: the window stays what admission control was sized for, a read-ahead
    # no larger than a message can be.
    assert options["grpc.http2.bdp_probe"] == 0
    assert options["grpc.http2.lookahead_bytes"] == 1048576
    # a window's worth of message may come as one frame (HTTP/2 allows 16 KiB .. 16 MiB)
    assert options["grpc.http2.max_frame_size"] == 1048576
    small = dict(grpc_server_options(_config(tmp_path, **{"server.max_message_bytes": 65536})))
    large = dict(grpc_server_options(_config(tmp_path, **{"server.max_message_bytes": 1 << 28})))
    tiny = dict(grpc_server_options(_config(tmp_path, **{"server.max_message_bytes": 4096})))
    assert small["grpc.http2.lookahead_bytes"] == small["grpc.http2.max_frame_size"] == 65536
    assert large["grpc.http2.lookahead_bytes"] == large["grpc.http2.max_frame_size"] == 1048576
    assert tiny["grpc.http2.max_frame_size"] == 16384


def test_create_server_hosts_every_router_and_serves_until_stopped(tmp_path: Path) -> None:
    config = _config(tmp_path)

    async def run():
        running = await create_server(config, registry=CollectorRegistry())
        try:
            assert sorted(running.chains) == ["a", "b"]
            assert running.health.ready and running.pool.stats().max_workers >= 1
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                listed = await pb_grpc.RouterServiceStub(channel).ListRouters(
                    pb.ListRoutersRequest())
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=running.health.service_name("a")))
            metrics = await asyncio.to_thread(
                lambda: urllib.request.urlopen(
                    f"http://127.0.0.1:{running.metrics_port}/metrics").read().decode())
            ready = await asyncio.to_thread(
                lambda: urllib.request.urlopen(
                    f"http://127.0.0.1:{running.health_port}/readyz").status)
        finally:
            await running.stop(0)
        return running, listed, health, metrics, ready

    running, listed, health, metrics, ready = asyncio.run(run())
    assert [(r.name, r.layers, r.batches_across_requests) for r in listed.routers] == [
        ("a", 2, True), ("b", 1, False)]
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert 'moe_router_build_info{' in metrics and ready == 200
    assert "_created" not in metrics and "process_resident_memory_bytes" in metrics
    assert running.health.draining


def test_a_taken_port_is_one_clear_error_before_any_router_loads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _config(tmp_path, **{"metrics.port": port})
        with pytest.raises(OSError, match=rf"metrics.port: could not listen on 127.0.0.1:{port}"):
            asyncio.run(create_server(config, registry=CollectorRegistry()))


def test_serve_freezes_the_loaded_server_out_of_the_cyclic_collector(tmp_path: Path) -> None:
    """`moe-router serve` moves what loading made out of the collector's full scans (one
    such scan held the loop 131 ms under load) before it listens, then serves as usual."""
    server = start_server(write_config(tmp_path / "config.yaml", small_routers()[:1]))
    try:
        with RouterClient(server.target, timeout=30) as client:
            answer = client.route("mixtral", np.ones((2, 64), np.float32))
    finally:
        status = server.terminate()
    log = server.log()
    frozen = re.search(r"froze (\d+) objects of the loaded server", log)
    assert status == 0 and frozen is not None, log
    assert int(frozen.group(1)) > 10_000  # modules, routers, gRPC and torch: ~190,000 here
    assert log.index("froze") < log.index("listening on")
    assert answer.expert_indices.shape == (2, 2)
