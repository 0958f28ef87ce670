"""The bench's reading of a server's CPU: real child processes that burn known CPU in their
main thread or in another, read from outside; the per-call figures by hand."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from moe_router.analysis.server_cpu import (
    MIN_CALLS_PER_CALLER,
    MIN_TICKS_PER_WINDOW,
    CpuReading,
    ServerCpu,
    calls_inside,
    read_cpu,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads another process's CPU clock and /proc")

# Burns about 0.4 s of CPU in the thread named by argv[1], says so, then waits for stdin.
_BURNER = """
import sys, threading, time
def burn():
    end = time.thread_time() + 0.4
    while time.thread_time() < end:
        pass
if sys.argv[1] == "main":
    burn()
else:
    worker = threading.Thread(target=burn)
    worker.start()
    worker.join()
print("burnt", flush=True)
sys.stdin.read()
"""


def _burnt(where: str) -> tuple[CpuReading, CpuReading]:
    child = subprocess.Popen([sys.executable, "-c", _BURNER, where], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        before = read_cpu(child.pid)
        assert child.stdout is not None and child.stdout.readline() == "burnt\n"
        after = read_cpu(child.pid)
    finally:
        child.communicate("")
    assert before is not None and after is not None
    return before, after


def test_cpu_burnt_in_the_main_thread_counts_for_the_process_and_its_loop() -> None:
    before, after = _burnt("main")
    assert after.process_s - before.process_s >= 0.38
    assert after.main_thread_s - before.main_thread_s >= 0.35  # clock ticks: 10 ms steps
    assert after.at > before.at


def test_cpu_burnt_in_another_thread_counts_for_the_process_only() -> None:
    before, after = _burnt("worker")
    assert after.process_s - before.process_s >= 0.38  # an ended thread's time stays counted
    assert after.main_thread_s - before.main_thread_s <= 0.1  # start-up and waiting only


def test_a_process_that_is_gone_gives_no_reading() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert read_cpu(child.pid) is None


def test_figures_per_call_by_hand() -> None:
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    before = CpuReading(at=10.0, process_s=2.0, main_thread_s=1.0)
    after = CpuReading(at=11.0, process_s=2.5, main_thread_s=1.3)
    cpu = ServerCpu.between(before, after, 1000)
    assert (cpu.process_s, cpu.main_thread_s, cpu.wall_s, cpu.calls) == pytest.approx(
        (0.5, 0.3, 1.0, 1000))
    assert cpu.us_per_call == pytest.approx(500.0)
    assert cpu.loop_us_per_call == pytest.approx(300.0)
    assert cpu.loop_busy == pytest.approx(0.3)

    merged = ServerCpu.merged([cpu, ServerCpu(0.1, 0.1, 1.0, 1000)])
    assert merged is not None and merged.windows == 2
    assert merged.us_per_call == pytest.approx(300.0)  # 0.6 s over 2000 calls
    assert merged.loop_busy == pytest.approx(0.2)  # 0.4 s of 2 s
    assert ServerCpu.merged([]) is None

    assert ServerCpu(0.5, 0.3, 1.0, 0).us_per_call is None  # no call answered
    short = ServerCpu(0.01, 0.01, (MIN_TICKS_PER_WINDOW - 1) * tick_s, 10)
    assert short.us_per_call == pytest.approx(1000.0)  # the process clock is exact
    assert short.loop_us_per_call is None and short.loop_busy is None  # ticks too coarse
    # 16 callers whose calls are long against the window: the calls at its edges are
    # guessed at, so no per-call figure
    few = ServerCpu(0.4, 0.1, 0.4, MIN_CALLS_PER_CALLER * 16 - 1, in_flight=16)
    assert few.us_per_call is None and few.loop_us_per_call is None
    assert few.loop_busy == pytest.approx(0.25)  # what the window itself saw still holds
    enough = ServerCpu(0.4, 0.1, 0.4, MIN_CALLS_PER_CALLER * 16, in_flight=16)
    assert enough.us_per_call == pytest.approx(0.4 / 160 * 1e6)


def test_a_call_counts_for_its_share_inside_the_window() -> None:
    starts = [0.0, 1.0, 2.5, 3.5, 5.0]
    ends = [1.0, 2.0, 3.5, 4.5, 6.0]
    # window [1.5, 4.0]: half of the second call, all of the third, half of the fourth;
    # the first ended and the last began outside it
    assert calls_inside(starts, ends, 1.5, 4.0) == pytest.approx(2.0)
    assert calls_inside([2.0], [2.0], 1.5, 4.0) == 1.0  # no measurable length, inside
    assert calls_inside([], [], 0.0, 1.0) == 0.0


def test_a_load_run_reads_the_echo_servers_cpu_over_its_window() -> None:
    from moe_router.analysis import echo_server
    from moe_router.analysis.load_client import (
        ListeningProcess,
        LoadClientPool,
        LoadSpec,
        python_file_command,
    )

    server = ListeningProcess(python_file_command(echo_server.__file__), dict(os.environ), "echo")
    try:
        target = server.wait_ready()
        spec = LoadSpec(target, "echo", router="r", tokens=1, dim=4, response_bytes=64)
        with LoadClientPool(1) as pool:
            started = time.monotonic()
            watched = pool.run(spec, 4, 0.05, 0.4, watch_pid=server.proc.pid)
            assert time.monotonic() - started >= 0.45
            unwatched = pool.run(spec, 1, 0.02, 0.05)
    finally:
        server.stop()
    cpu = watched.server_cpu
    assert cpu is not None and unwatched.server_cpu is None
    assert 0 < cpu.calls <= watched.calls  # calls that ended inside the window
    assert cpu.wall_s == pytest.approx(0.4, abs=0.05)
    # an answer costs the echo at least some microseconds, and it cannot use more CPU
    # than this machine has in the window
    assert cpu.us_per_call is not None and cpu.us_per_call > 1.0
    assert cpu.process_s <= cpu.wall_s * (os.cpu_count() or 1) + 0.05
    assert cpu.loop_busy is not None and 0 < cpu.loop_busy <= 1.05
