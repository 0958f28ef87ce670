"""scripts/measure_side_by_side.py as a developer runs it: real servers from config files
(one from a second source tree), the echo, real Route calls; and a refusal when the
servers do not route alike."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from server_process import small_routers, write_config

from moe_router_client.tensors import to_wire
from moe_router_client.v1 import router_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "measure_side_by_side.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=240, cwd=ROOT)


def mixtral(seed: int) -> list[dict]:
    (router,) = [r for r in small_routers() if r["name"] == "mixtral"]
    return [{**router, "weights": {"init": "random", "seed": seed}}]


def test_two_trees_and_the_echo_are_timed_in_turns(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", mixtral(1))
    other_tree = tmp_path / "tree"  # a copy of the sources, as a git worktree would be
    for part in ("server", "client"):
        shutil.copytree(ROOT / part, other_tree / part,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    version_file = other_tree / "server" / "moe_router" / "__init__.py"
    version = re.search(r'__version__ = "(.+)"', version_file.read_text()).group(1)
    version_file.write_text(version_file.read_text().replace(version, version + "+tree"))
    done = run(f"here={config}", f"there={config}@{other_tree}", "--tokens", "3",
               "--rounds", "2", "--seconds", "0.2")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert re.search(rf"^here: moe-router {re.escape(version)} on cpu, .*config.yaml$", out, re.M)
    assert re.search(rf"^there: moe-router {re.escape(version)}\+tree on cpu, .* from ", out,
                     re.M), out  # the second server runs the other tree's code
    assert "mixtral, 3 x float32\ngRPC door: " in out
    rounds = re.findall(r"^round (\d): here (\d+), there (\d+), echo (\d+)$", out, re.M)
    assert [r[0] for r in rounds] == ["0", "1"]
    for name in ("here", "there", "echo"):
        median = re.search(rf"^\s*{name}: median (\d+) us, ([\d.]+)x the echo", out, re.M)
        assert median is not None, out
        assert int(median.group(1)) > 0
    assert re.search(r"echo: median \d+ us, 1\.000x the echo", out)
    for name in ("here", "there", "echo"):  # each server's own CPU clock, read apart
        cpu = re.search(rf"^\s*{name}: (\d+) calls/s, server CPU median (\d+) us a call", out,
                        re.M)
        assert cpu is not None, out
        assert int(cpu.group(1)) > 0 and int(cpu.group(2)) > 0


def test_several_callers_per_turn_over_grpc_only(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", mixtral(1))
    done = run(f"a={config}", "--callers", "4", "--rounds", "1", "--seconds", "0.3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "p50 us, 4 callers" in done.stdout
    assert re.search(r"^\s*a: \d+ calls/s, server CPU median \d+ us a call", done.stdout, re.M)
    refused = run(f"a={config}", "--door", "colocated", "--callers", "4")
    assert refused.returncode == 2 and "only with --door grpc" in refused.stderr


def test_the_colocated_door_is_timed_against_the_first_server(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", mixtral(1))
    done = run(f"a={config}", f"b={config}", "--door", "colocated", "--dtype", "bfloat16",
               "--rounds", "1", "--seconds", "0.2")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "mixtral, 1 x bfloat16" in out and "co-located door" in out
    assert re.search(r"^round 0: a \d+, b \d+$", out, re.M), out
    assert re.search(r"^\s*a: median \d+ us, 1\.000x a,", out, re.M)
    assert "echo" not in out


def test_servers_that_route_differently_are_not_compared(tmp_path: Path) -> None:
    one = write_config(tmp_path / "one.yaml", mixtral(1))
    two = write_config(tmp_path / "two.yaml", mixtral(2))
    done = run(f"one={one}", f"two={two}", "--rounds", "1", "--seconds", "0.1")
    assert done.returncode != 0
    assert "two answers differently from one" in done.stderr
    assert "expert_weights" in done.stderr
    assert "round 0" not in done.stdout  # nothing was timed


def _script_module():
    spec = importlib.util.spec_from_file_location("measure_side_by_side", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_rounding_lets_float_answers_differ_by_that_much_only() -> None:
    """Weights one float32 ulp apart are different routing by default and the same with
    --rounding 1e-6; other experts, or weights further apart, never are (both doors'
    comparisons)."""
    script = _script_module()
    indices = np.array([[0, 3], [2, 1]], np.int32)
    weights = np.array([[0.75, 0.25], [0.5, 0.5]], np.float32)
    ulp_apart = np.nextafter(weights, np.float32(2.0))

    def answer(idx: np.ndarray, w: np.ndarray) -> bytes:
        response = pb.RouteResponse()
        to_wire(idx, out=response.expert_indices)
        to_wire(w, out=response.expert_weights)
        response.info.router_version = "v1"
        return response.SerializeToString()

    base = answer(indices, weights)
    assert script.differences(answer(indices, ulp_apart), base) == ["expert_weights"]
    assert script.differences(answer(indices, ulp_apart), base, 1e-6) == []
    assert script.differences(answer(indices, weights * 1.01), base, 1e-6) == ["expert_weights"]
    assert script.differences(answer(indices[:, ::-1].copy(), weights), base,
                              1e-6) == ["expert_indices"]

    def result(idx: np.ndarray, w: np.ndarray) -> SimpleNamespace:
        info = SimpleNamespace(tokens_per_expert=[1, 1, 1, 1], router_version="v1")
        return SimpleNamespace(expert_indices=idx, expert_weights=w,
                               num_experts_per_token=np.full(2, 2, np.int32), info=info)

    colocated = script.colocated_differences
    assert colocated(result(indices, ulp_apart), result(indices, weights)) == ["expert_weights"]
    assert colocated(result(indices, ulp_apart), result(indices, weights), 1e-6) == []
    assert colocated(result(indices[:, ::-1].copy(), ulp_apart), result(indices, weights),
                     1e-6) == ["expert_indices"]


def test_rounding_is_an_option_of_the_command(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", mixtral(1))
    done = run(f"a={config}", f"b={config}", "--rounding", "1e-6", "--rounds", "1",
               "--seconds", "0.1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^round 0: a \d+, b \d+, echo \d+$", done.stdout, re.M), done.stdout


def test_a_server_that_cannot_start_is_reported_with_its_own_error(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "bad.yaml", [{**mixtral(1)[0], "top_k": 9}])
    done = run(f"bad={bad}", "--rounds", "1", "--seconds", "0.1")
    assert done.returncode == 1
    assert "bad did not start" in done.stderr
    assert "routers[0].top_k: must be <= num_experts (8), got 9" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_server_argument_names_the_expected_form() -> None:
    done = run("no-equals-sign")
    assert done.returncode == 2
    assert "expected NAME=CONFIG[@CHECKOUT]" in done.stderr
