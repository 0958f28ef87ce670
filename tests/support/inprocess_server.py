"""Run the real moe-router server inside the test process, for end-to-end tests.

``serve_in_process`` is ``moe-router serve --config CONFIG`` without the child process:
it loads the config with ``load_config`` and runs ``create_server`` (fresh metrics
registry) on an event loop of its own in a background thread. Tests still call it over
real gRPC and HTTP on 127.0.0.1, with the blocking ``RouterClient``, grpc stubs, the
async client on their own loop, or the CLI in a child process; only the server's process
is the test's. That saves the interpreter start, the imports and the SIGTERM drain of a
child per server. Tests of the process itself (SIGTERM, exit statuses, start-up
failures, ports refused) keep ``server_process.start_server``.

The handle has the surface of ``server_process.ServerProcess`` that such tests read:
``target``, ``port``, ``metrics_port``, ``health_port`` and ``log()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from moe_router.config import load_config
from moe_router.doors.server import RunningServer, create_server

__all__ = ["InProcessServer", "serve_in_process"]

# What serve() gives logging.basicConfig, so log() reads like a server's stderr.
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _LogRecorder(logging.Handler):
    """Keeps every formatted record that reaches the root logger."""

    def __init__(self, level: str) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter(_LOG_FORMAT))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + "\n")


@dataclass(frozen=True)
class InProcessServer:
    """A server started by ``create_server`` in this process, and what it logged."""

    running: RunningServer
    host: str
    _log: _LogRecorder = field(repr=False)

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def metrics_port(self) -> int | None:
        return self.running.metrics_port

    @property
    def health_port(self) -> int | None:
        return self.running.health_port

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def log(self) -> str:
        """Every record logged in this process from before start-up until now, at the
        server's ``log_level`` (the lines ``serve()`` would write to stderr)."""
        return "".join(self._log.lines)


@contextmanager
def serve_in_process(
    config: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    timeout: float = 90.0,
) -> Iterator[InProcessServer]:
    """Serve ``config`` until the block ends, then stop with no grace (``stop(0)``).

    env: the environment the config reads, empty when None, so the test process's own
    ``DYNAMIC_MOE_*`` settings never leak in. Start-up errors (a bad config, a taken port)
    are raised here as ``create_server`` raises them.
    """
    service_config = load_config(config, env={} if env is None else env, overrides=overrides)
    recorder = _LogRecorder(service_config.server.log_level)
    root = logging.getLogger()
    root_level = root.level
    root.setLevel(min(root.getEffectiveLevel(), recorder.level))
    root.addHandler(recorder)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="inprocess-server", daemon=True)
    thread.start()
    try:
        started = asyncio.run_coroutine_threadsafe(
            create_server(service_config, registry=CollectorRegistry()), loop
        )
        try:
            running = started.result(timeout)
        except TimeoutError:
            started.cancel()
            raise
        try:
            yield InProcessServer(running, service_config.server.host, recorder)
        finally:
            asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(timeout)
    finally:
        asyncio.run_coroutine_threadsafe(_close_loop(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        loop.close()
        root.removeHandler(recorder)
        root.setLevel(root_level)


async def _close_loop() -> None:
    """What ``asyncio.run`` does before closing a loop: cancel the tasks left, finish
    async generators, join the default executor (``asyncio.to_thread``'s threads)."""
    current = asyncio.current_task()
    left = [task for task in asyncio.all_tasks() if task is not current]
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)
    loop = asyncio.get_running_loop()
    await loop.shutdown_asyncgens()
    await loop.shutdown_default_executor()
