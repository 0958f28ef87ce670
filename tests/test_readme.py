"""The README's Python examples run as written (in-process ones here, the client ones,
RouterClient's, tritonclient's and CoLocatedClient's, against the real server, started in
this process, on the default config)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from inprocess_server import serve_in_process

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
TRITON = [b for b in BLOCKS if "tritonclient" in b]
CLIENT = [b for b in BLOCKS if "RouterClient" in b]
COLOCATED = [b for b in BLOCKS if "CoLocatedClient" in b]
IN_PROCESS = [b for b in BLOCKS if b not in CLIENT + TRITON + COLOCATED]


def test_readme_has_the_promised_examples():
    assert len(IN_PROCESS) == 3 and len(CLIENT) == 1 and len(TRITON) == 2
    assert len(COLOCATED) == 1
    assert len([line for line in COLOCATED[0].splitlines() if line.strip()]) <= 10
    assert all(len(block.strip().splitlines()) <= 12 for block in BLOCKS)
    assert len([line for line in TRITON[0].splitlines() if line.strip()]) <= 10  # 10 lines


@pytest.mark.parametrize("block", IN_PROCESS, ids=["MoERouter", "TopKRouter", "DynamicRouter"])
def test_in_process_example_runs(block: str):
    exec(compile(block, "README.md", "exec"), {})


def test_serving_stack_example_runs_against_the_default_config():
    env = {"DYNAMIC_MOE_PORT": "0", "DYNAMIC_MOE_METRICS_PORT": "0",
           "DYNAMIC_MOE_HEALTH_PORT": "0"}
    config = Path(__file__).resolve().parents[1] / "config.yaml"
    with serve_in_process(config, env=env) as server:
        for block in (*CLIENT, *TRITON, *COLOCATED):  # Route's, the OIP ones, the door's
            code = block.replace("127.0.0.1:50051", server.target)
            exec(compile(code, "README.md", "exec"), {})
        transport = {}  # the door's example went through the door, not the fallback
        exec(compile(COLOCATED[0].replace("127.0.0.1:50051", server.target).replace(
            "print(client.transport)", "transport['used'] = client.transport"), "README.md",
            "exec"), {"transport": transport})
        assert transport["used"] == "colocated"
