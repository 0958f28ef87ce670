"""Load-generating client processes of ``moe-router bench``, and the pool that drives them.

Each worker is a separate interpreter (so clients never share the measured server's, or
each other's, GIL) running grpc.aio closed-loop callers: ``concurrency`` coroutines, each
sending its next call as soon as the last one answered, over one channel per target.
Workers build their own request (seeded random hidden states, never shipped over the
pipe), warm up until a start instant the parent chose, time calls until an end instant,
and report every call's (start, end) on the shared monotonic clock; the parent turns
them into latencies and a throughput over the span all of them cover.

Parent and worker talk in JSON lines over the worker's stdin/stdout:
``prepare`` (a :class:`LoadSpec`) -> ``{"request_bytes"}``, then ``go`` -> the calls.
A worker exits when its stdin closes, so a vanished parent leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["ListeningProcess", "LoadClientPool", "LoadResult", "LoadSpec", "child_process_kwargs",
           "python_file_command", "route_response_bytes"]

ROUTE_METHOD = "/moe_router.v1.RouterService/Route"
_CALL_TIMEOUT_S = 300.0
_MAX_CONSECUTIVE_ERRORS = 20
_MIN_TIMED_CALLS = 3  # per caller, past the end instant if need be (100 MB requests)
_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
_LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")

Method = Literal["route", "echo"]


@dataclass(frozen=True)
class LoadSpec:
    """What every call of a load run sends.

    method: ``route`` calls the service's Route; ``echo`` sends the same serialized
    RouteRequest to the echo server, asking for ``response_bytes`` back. The request
    holds ``tokens x dim`` seeded standard-normal hidden states in ``dtype`` (float32 or
    bfloat16), with ``skip_cache`` set; ``payload_bytes`` > 0 sends that many raw bytes
    instead (echo only, for the large-message test).
    """

    target: str
    method: Method
    router: str = ""
    tokens: int = 1
    dim: int = 1
    dtype: str = "float32"
    response_bytes: int = 0
    payload_bytes: int = 0
    seed: int = 0


@dataclass(frozen=True)
class LoadResult:
    """The timed calls of one load run, over every worker and coroutine.

    latencies_ms: one per successful timed call. span_s: first start to last end of those
    calls. request_bytes / response_bytes: serialized sizes of one call each way.
    """

    latencies_ms: list[float]
    span_s: float
    errors: int
    request_bytes: int
    response_bytes: int
    first_error: str

    @property
    def calls(self) -> int:
        """Successful timed calls."""
        return len(self.latencies_ms)


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


# --------------------------------------------------------------------- worker side
def _build_request(spec: LoadSpec) -> tuple[Any, Any]:
    """(request, serializer): a RouteRequest and its SerializeToString, or raw bytes."""
    if spec.payload_bytes > 0:
        return bytes(spec.payload_bytes), None
    import numpy as np

    from moe_router_client.tensors import to_wire
    from moe_router_client.v1 import router_pb2 as pb

    hidden = np.random.default_rng(spec.seed).standard_normal((spec.tokens, spec.dim),
                                                              dtype=np.float32)
    request = pb.RouteRequest(router=spec.router, layer=0, skip_cache=True)
    if spec.dtype == "bfloat16":  # the upper half of each float32 is its bf16 pattern
        to_wire((hidden.view(np.uint32) >> 16).astype(np.uint16), dtype=pb.BFLOAT16,
                out=request.hidden_states)
    else:
        to_wire(hidden, out=request.hidden_states)
    return request, pb.RouteRequest.SerializeToString


class _Worker:
    """One worker process: a channel per target, the last prepared request, the drive loop."""

    def __init__(self) -> None:
        import grpc

        self._grpc = grpc
        self._channels: dict[str, Any] = {}
        self._request_key: tuple[Any, ...] | None = None
        self._request: Any = None
        self._serializer: Any = None
        self._call: Any = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    def prepare(self, spec: LoadSpec, echo_method: str, echo_key: str) -> dict[str, Any]:
        key = (spec.router, spec.tokens, spec.dim, spec.dtype, spec.payload_bytes, spec.seed)
        if key != self._request_key:
            self._request = None  # let the old one go before building the new one
            self._request, self._serializer = _build_request(spec)
            self._request_key = key
        channel = self._channels.get(spec.target)
        if channel is None:
            channel = self._channels[spec.target] = self._grpc.aio.insecure_channel(
                spec.target, options=[("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES)])
        if spec.method == "route":
            from moe_router_client.v1 import router_pb2 as pb

            self._call = channel.unary_unary(ROUTE_METHOD, request_serializer=self._serializer,
                                             response_deserializer=pb.RouteResponse.FromString)
            self._metadata = ()
        else:
            self._call = channel.unary_unary(echo_method, request_serializer=self._serializer)
            self._metadata = ((echo_key, str(spec.response_bytes)),)
        size = len(self._request) if self._serializer is None else self._request.ByteSize()
        return {"request_bytes": size}

    async def go(self, concurrency: int, warmup_until: float, measure_until: float
                 ) -> dict[str, Any]:
        starts: list[float] = []
        ends: list[float] = []
        errors: list[str] = []
        response_bytes = [0]

        async def one_call() -> float | None:
            start = time.monotonic()
            try:
                response = await self._call(self._request, timeout=_CALL_TIMEOUT_S,
                                            metadata=self._metadata)
            except self._grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
                return None
            if not response_bytes[0]:
                response_bytes[0] = (len(response) if isinstance(response, bytes)
                                     else response.ByteSize())
            return start

        async def caller() -> None:
            failures = 0
            while failures < _MAX_CONSECUTIVE_ERRORS:  # warm up, at least one call
                failures = 0 if await one_call() is not None else failures + 1
                if time.monotonic() >= warmup_until:
                    break
            timed = 0
            while failures < _MAX_CONSECUTIVE_ERRORS and (timed < _MIN_TIMED_CALLS
                                                          or time.monotonic() < measure_until):
                start = await one_call()
                if start is None:
                    failures += 1
                    continue
                failures = 0
                starts.append(start)
                ends.append(time.monotonic())
                timed += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return {"starts": starts, "ends": ends, "errors": len(errors),
                "first_error": errors[0] if errors else "", "response_bytes": response_bytes[0]}

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


async def _worker_main() -> None:
    worker = _Worker()
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            message = json.loads(line)
            if message["op"] == "prepare":
                reply = worker.prepare(LoadSpec(**message["spec"]), message["echo_method"],
                                       message["echo_key"])
            else:
                reply = await worker.go(message["concurrency"], message["warmup_until"],
                                        message["measure_until"])
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        await worker.close()


# --------------------------------------------------------------------- parent side
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
            python_file_command(__file__), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True, env=env, **child_process_kwargs())
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

    def run(self, spec: LoadSpec, concurrency: int, warmup_s: float, duration_s: float
            ) -> LoadResult:
        """``concurrency`` closed-loop callers of ``spec`` for ``warmup_s`` + ``duration_s``
        (every caller makes at least one warmup call and three timed calls)."""
        if concurrency < 1:
            raise ValueError(f"concurrency: must be >= 1, got {concurrency}")
        used = self._workers[:min(concurrency, len(self._workers))]
        shares = [concurrency // len(used) + (i < concurrency % len(used))
                  for i in range(len(used))]
        deadline = time.monotonic() + self.job_timeout_s
        from moe_router.analysis.echo_server import ECHO_METHOD, RESPONSE_BYTES_KEY

        for worker in used:  # the worker imports nothing of ours but the client package
            worker.send({"op": "prepare", "spec": asdict(spec), "echo_method": ECHO_METHOD,
                         "echo_key": RESPONSE_BYTES_KEY})
        request_bytes = [w.receive(deadline)["request_bytes"] for w in used][0]
        warmup_until = time.monotonic() + warmup_s
        for worker, share in zip(used, shares, strict=True):
            worker.send({"op": "go", "concurrency": share, "warmup_until": warmup_until,
                         "measure_until": warmup_until + duration_s})
        parts = [w.receive(deadline) for w in used]
        starts = [s for p in parts for s in p["starts"]]
        ends = [e for p in parts for e in p["ends"]]
        errors = [p["first_error"] for p in parts if p["first_error"]]
        return LoadResult(
            latencies_ms=[(e - s) * 1e3 for s, e in zip(starts, ends, strict=True)],
            span_s=(max(ends) - min(starts)) if starts else 0.0,
            errors=sum(p["errors"] for p in parts),
            request_bytes=int(request_bytes),
            response_bytes=max(int(p["response_bytes"]) for p in parts),
            first_error=errors[0] if errors else "",
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


if __name__ == "__main__":
    try:
        asyncio.run(_worker_main())
    except KeyboardInterrupt:
        pass
    os._exit(0)  # skip grpc's atexit teardown: the parent only waits for the exit
