"""The parent side of ``moe-router bench``'s load clients: the worker pool and child servers.

:class:`LoadClientPool` keeps ``procs`` worker processes
(:mod:`moe_router.analysis.load_worker`, one interpreter each, so clients never share
the measured server's, or each other's, GIL) and spreads a run's concurrency over them;
it turns the (start, end) of every timed call into latencies and a throughput over the
span all of them cover. :class:`ListeningProcess` is a child server (the service or an
echo) that announces ``listening on HOST:PORT``.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe_router.analysis import load_worker
from moe_router.analysis.load_worker import LoadSpec, Transport, transport_unavailable
from moe_router.analysis.server_cpu import ServerCpu, calls_inside, read_cpu

__all__ = ["ListeningProcess", "LoadClientPool", "LoadResult", "LoadSpec", "Transport",
           "TransportUnavailable", "child_process_kwargs", "python_file_command",
           "route_response_bytes", "transport_unavailable"]

_LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")


class TransportUnavailable(RuntimeError):
    """The workers cannot drive the spec's transport here; the message is the one-line why."""


@dataclass(frozen=True)
class LoadResult:
    """The timed calls of one load run, over every worker and coroutine.

    latencies_ms: one per successful timed call. span_s: first start to last end of those
    calls. request_bytes / response_bytes: serialized sizes of one call each way.
    server_cpu: the watched server's CPU over the timed window (``run(watch_pid=)``), None
    when no server was watched or its clocks could not be read.
    """

    latencies_ms: list[float]
    span_s: float
    errors: int
    request_bytes: int
    response_bytes: int
    first_error: str
    server_cpu: ServerCpu | None = None

    @property
    def calls(self) -> int:
        """Successful timed calls."""
        return len(self.latencies_ms)

    @classmethod
    def merged(cls, runs: Sequence[LoadResult]) -> LoadResult:
        """One result of several runs of the same spec (rounds of one cell): latencies
        together, spans and errors summed."""
        if not runs:
            raise ValueError("runs: needs at least one run")
        return cls(latencies_ms=[ms for r in runs for ms in r.latencies_ms],
                   span_s=sum(r.span_s for r in runs), errors=sum(r.errors for r in runs),
                   request_bytes=runs[0].request_bytes,
                   response_bytes=max(r.response_bytes for r in runs),
                   first_error=next((r.first_error for r in runs if r.first_error), ""),
                   server_cpu=ServerCpu.merged(
                       [r.server_cpu for r in runs if r.server_cpu is not None]))


def route_response_bytes(tokens: int, top_k: int, num_experts: int) -> int:
    """Serialized size of a typical RouteResponse for ``tokens`` tokens (no optional tensors):
    the echo's answer when the service's own answer was not seen."""
    import numpy as np

    from moe_router_client.tensors import to_wire
    from moe_router_client.v1 import router_pb2 as pb

    response = pb.RouteResponse(
        expert_indices=to_wire(np.full((tokens, top_k), num_experts - 1, np.int32)),
        expert_weights=to_wire(np.full((tokens, top_k), 0.5, np.float32)),
        num_experts_per_token=to_wire(np.full((tokens,), top_k, np.int32)),
        info=pb.RoutingInfo(tokens_per_expert=[tokens * top_k] * num_experts,
                            router_version="0123456789abcdef", batch_requests=1,
                            batch_tokens=tokens, queue_time_us=100, compute_time_us=100,
                            request_id="0" * 32, aux_loss=0.1),
    )
    return response.ByteSize()


def python_file_command(path: str | Path, *args: str) -> list[str]:
    """Run a module's file as ``__main__`` without importing its package (``-m`` would load
    ``moe_router.analysis`` and torch into a process that needs neither)."""
    code = "import runpy, sys; runpy.run_path(sys.argv.pop(1), run_name='__main__')"
    return [sys.executable, "-c", code, str(path), *args]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def child_process_kwargs() -> dict[str, Any]:
    """Popen arguments for every bench child: its own session (Ctrl-C reaches the bench
    only, which then stops its children itself) and, on Linux, SIGTERM when the bench dies."""
    return {"start_new_session": True, "preexec_fn": _die_with_parent}


class ListeningProcess:
    """A child server (service or echo) that prints ``listening on HOST:PORT``; its output is
    kept for the error message if it never does."""

    def __init__(self, command: list[str], env: dict[str, str], label: str) -> None:
        self.label = label
        self.output: list[str] = []
        self.target = ""
        self._ready = threading.Event()
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, **child_process_kwargs())
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if not self.target and (m := _LISTENING.search(line)):
                self.target = f"{m.group(1)}:{m.group(2)}"
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 180.0) -> str:
        """Its ``host:port`` once listening; RuntimeError with its output if it never is."""
        if not self._ready.wait(timeout) or not self.target:
            tail = "".join(self.output[-20:])
            raise RuntimeError(f"{self.label} did not start (exit {self.proc.poll()}):\n{tail}")
        return self.target

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _WorkerProcess:
    def __init__(self, env: dict[str, str] | None) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            python_file_command(load_worker.__file__), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, **child_process_kwargs())
        self.replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.replies.put(line)
        self.replies.put(None)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def receive(self, deadline: float) -> dict[str, Any]:
        try:
            line = self.replies.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("a load client did not answer in time") from None
        if line is None:
            self.log.seek(0)
            tail = self.log.read()[-2000:]
            raise RuntimeError(f"a load client exited ({self.proc.poll()}):\n{tail}")
        return dict(json.loads(line))

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        for wait_s, then in ((1.0, self.proc.terminate), (5.0, self.proc.kill)):
            try:
                self.proc.wait(wait_s)  # idle workers exit at once; busy ones are ended
                break
            except subprocess.TimeoutExpired:
                then()
        self.proc.wait()
        self.log.close()


class LoadClientPool:
    """``procs`` persistent worker processes; a run spreads its concurrency over them.

    env: the workers' environment (default: this process's). Use as a context manager or
    call :meth:`close`; workers also exit if this process dies.
    """

    def __init__(self, procs: int = 2, env: dict[str, str] | None = None,
                 job_timeout_s: float = 600.0) -> None:
        if isinstance(procs, bool) or not isinstance(procs, int) or procs < 1:
            raise ValueError(f"procs: must be a positive integer, got {procs!r}")
        self.job_timeout_s = job_timeout_s
        self._workers: list[_WorkerProcess] = []
        try:
            for _ in range(procs):
                self._workers.append(_WorkerProcess(env))
        except BaseException:
            self.close()
            raise

    def run(self, spec: LoadSpec, concurrency: int, warmup_s: float, duration_s: float,
            watch_pid: int | None = None) -> LoadResult:
        """``concurrency`` closed-loop callers of ``spec`` for ``warmup_s`` + ``duration_s``
        (every caller makes at least one warmup call and three timed calls).

        ``watch_pid``: the server answering the calls, whose CPU clocks are read as the
        timed window opens and closes (``LoadResult.server_cpu``, for the calls inside it).

        Raises :class:`TransportUnavailable` when the workers cannot drive
        ``spec.transport`` here (the co-located client missing), before any call."""
        if concurrency < 1:
            raise ValueError(f"concurrency: must be >= 1, got {concurrency}")
        used = self._workers[:min(concurrency, len(self._workers))]
        shares = [concurrency // len(used) + (i < concurrency % len(used))
                  for i in range(len(used))]
        deadline = time.monotonic() + self.job_timeout_s
        from moe_router.analysis.echo_server import ECHO_METHOD, RESPONSE_BYTES_KEY

        for worker in used:
            worker.send({"op": "prepare", "spec": asdict(spec), "echo_method": ECHO_METHOD,
                         "echo_key": RESPONSE_BYTES_KEY})
        prepared = [w.receive(deadline) for w in used]
        for reply in prepared:
            if "unavailable" in reply:
                raise TransportUnavailable(reply["unavailable"])
            if "error" in reply:
                raise RuntimeError(f"a load client could not prepare {spec.transport} "
                                   f"calls: {reply['error']}")
        request_bytes = prepared[0]["request_bytes"]
        warmup_until = time.monotonic() + warmup_s
        measure_until = warmup_until + duration_s
        for worker, share in zip(used, shares, strict=True):
            worker.send({"op": "go", "concurrency": share, "warmup_until": warmup_until,
                         "measure_until": measure_until})
        window = None
        if watch_pid is not None:
            time.sleep(max(0.0, warmup_until - time.monotonic()))
            opened = read_cpu(watch_pid)
            time.sleep(max(0.0, measure_until - time.monotonic()))
            closed = read_cpu(watch_pid)
            window = None if opened is None or closed is None else (opened, closed)
        parts = [w.receive(deadline) for w in used]
        starts = [s for p in parts for s in p["starts"]]
        ends = [e for p in parts for e in p["ends"]]
        errors = [p["first_error"] for p in parts if p["first_error"]]
        server_cpu = None if window is None else ServerCpu.between(
            *window, calls_inside(starts, ends, window[0].at, window[1].at), concurrency)
        return LoadResult(
            latencies_ms=[(e - s) * 1e3 for s, e in zip(starts, ends, strict=True)],
            span_s=(max(ends) - min(starts)) if starts else 0.0,
            errors=sum(p["errors"] for p in parts),
            request_bytes=int(request_bytes),
            response_bytes=max(int(p["response_bytes"]) for p in parts),
            first_error=errors[0] if errors else "",
            server_cpu=server_cpu,
        )

    def close(self) -> None:
        """Stop every worker (closing its stdin; terminate, then kill, if it lingers)."""
        for worker in self._workers:
            worker.stop()
        self._workers.clear()

    def __enter__(self) -> LoadClientPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

