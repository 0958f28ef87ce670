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
from moe_router.errors import RouterConfigurationError
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


def test_read_ahead_sets_the_stream_window_up_to_the_largest_message(tmp_path: Path) -> None:
    def options(**overrides) -> dict:
        return dict(grpc_server_options(_config(tmp_path, **overrides)))

    wide = options(**{"server.read_ahead_bytes": 16 << 20, "server.max_message_bytes": 1 << 28})
    assert wide["grpc.http2.lookahead_bytes"] == 16 << 20
    assert wide["grpc.http2.max_frame_size"] == 1 << 20  # frames stay at most 1 MiB
    capped = options(**{"server.read_ahead_bytes": 16 << 20, "server.max_message_bytes": 4 << 20})
    assert capped["grpc.http2.lookahead_bytes"] == 4 << 20  # never past the largest message
    narrow = options(**{"server.read_ahead_bytes": 65536})
    assert narrow["grpc.http2.lookahead_bytes"] == narrow["grpc.http2.max_frame_size"] == 65536
    with pytest.raises(RouterConfigurationError, match="server.read_ahead_bytes"):
        options(**{"server.read_ahead_bytes": 1024})


def test_a_message_larger_than_the_default_read_ahead_arrives_whole(tmp_path: Path) -> None:
    """With ``server.read_ahead_bytes`` of 4 MiB a 3 MiB call is read in one window; its
    answer is the answer of its two halves routed apart (the router works row by row)."""
    config = _config(tmp_path, **{"server.read_ahead_bytes": 4 << 20,
                                  "server.max_message_bytes": 8 << 20})
    hidden = np.random.default_rng(3).standard_normal((98_304, 8)).astype(np.float32)

    async def run():
        running = await create_server(config, registry=CollectorRegistry())
        try:
            with RouterClient(f"127.0.0.1:{running.port}", timeout=60,
                              max_message_bytes=8 << 20) as client:
                whole = await asyncio.to_thread(client.route, "a", hidden)
                halves = [await asyncio.to_thread(client.route, "a", part)
                          for part in np.split(hidden, 2)]
        finally:
            await running.stop(0)
        return whole, halves

    whole, halves = asyncio.run(run())
    assert hidden.nbytes == 3 << 20  # past the 1 MiB default, inside the 4 MiB read-ahead
    assert np.array_equal(whole.expert_indices,
                          np.concatenate([h.expert_indices for h in halves]))
    assert np.array_equal(whole.expert_weights,
                          np.concatenate([h.expert_weights for h in halves]))


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
