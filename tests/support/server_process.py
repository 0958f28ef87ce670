"""Start a real moe-router server process on loopback for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")
_METRICS = re.compile(r"metrics on http://([\d.]+):(\d+)/metrics")
_HEALTH = re.compile(r"health on http://([\d.]+):(\d+)/readyz")


def small_routers(*, fault_dir: Path | None = None) -> list[dict]:
    """Tiny routers of every kind, so the suite runs in seconds on two cores."""
    routers = [
        {
            "name": "mixtral",
            "kind": "top_k",
            "input_dim": 64,
            "num_experts": 8,
            "top_k": 2,
            "layers": 2,
            "weights": {"init": "random", "seed": 1},
        },
        {
            "name": "deepseek",
            "kind": "grouped_top_k",
            "input_dim": 32,
            "num_experts": 16,
            "top_k": 4,
            "n_group": 4,
            "topk_group": 2,
            "scoring": "sigmoid",
            "group_score": "top2_sum",
            "use_correction_bias": True,
            "routed_scaling_factor": 2.5,
            "weights": {"init": "random", "seed": 2},
        },
        {
            "name": "expert-choice",
            "kind": "expert_choice",
            "input_dim": 32,
            "num_experts": 4,
            "capacity_factor": 1.0,
            "weights": {"init": "random", "seed": 3},
        },
        {
            "name": "soft",
            "kind": "soft_moe",
            "input_dim": 32,
            "num_experts": 4,
            "slots_per_expert": 2,
            "weights": {"init": "random", "seed": 4},
        },
        {
            "name": "dynamic",
            "kind": "dynamic",
            "input_dim": 32,
            "num_experts": 8,
            "min_experts": 1,
            "max_experts": 4,
            "weights": {"init": "random", "seed": 5},
        },
    ]
    if fault_dir is not None:
        routers.append(
            {
                "name": "faulty",
                "kind": "fault_injection",
                "input_dim": 16,
                "num_experts": 4,
                "top_k": 2,
                "weights": {"init": "random", "seed": 6},
                "fault": {
                    "fail_while_file_exists": str(fault_dir / "fail"),
                    "slow_while_file_exists": str(fault_dir / "slow"),
                    "slow_ms": 300,
                },
            }
        )
    return routers


def write_config(path: Path, routers: list[dict], **sections: dict) -> Path:
    """A config.yaml on loopback with every port picked by the OS."""
    config: dict = {
        "server": {
            "host": "127.0.0.1",
            "port": 0,
            "device": "cpu",
            "drain_grace_s": 5.0,
            "max_workers": 2,
        },
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "health": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "routers": routers,
    }
    for key, value in sections.items():
        config.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any DYNAMIC_MOE_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNAMIC_MOE_")}
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ServerProcess:
    """A running `moe-router serve` child; output is collected for failure messages."""

    proc: subprocess.Popen
    host: str
    port: int
    metrics_port: int | None
    health_port: int | None
    output: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log(self) -> str:
        return "".join(self.output)


def start_server(
    config: Path, env: dict[str, str] | None = None, timeout: float = 90.0
) -> ServerProcess:
    """Run ``python -m moe_router serve --config CONFIG`` and wait for its listening line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_router", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env if env is not None else clean_env(),
    )
    output: list[str] = []
    found: dict[str, tuple[str, int]] = {}
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if m := _METRICS.search(line):
                found["metrics"] = (m.group(1), int(m.group(2)))
            if m := _HEALTH.search(line):
                found["health"] = (m.group(1), int(m.group(2)))
            if m := _LISTENING.search(line):
                found["grpc"] = (m.group(1), int(m.group(2)))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("server did not start:\n" + "".join(output))
    if "grpc" not in found:
        proc.wait(5)
        raise RuntimeError(f"server exited with {proc.returncode}:\n" + "".join(output))
    host, port = found["grpc"]
    metrics, health = found.get("metrics"), found.get("health")
    return ServerProcess(
        proc, host, port, metrics[1] if metrics else None, health[1] if health else None, output
    )
