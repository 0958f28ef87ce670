"""The README's Python examples run as written (in-process ones here, the client ones,
RouterClient's, tritonclient's and CoLocatedClient's, against the real server, started in
this process, on the default config)."""

from __future__ import annotations

import importlib.util
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
    assert len(COLOCATED) == 2  # the door in 10 lines, then its shared buffers
    assert len([line for line in COLOCATED[0].splitlines() if line.strip()]) <= 10
    assert "shared_buffer" in COLOCATED[1]
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


# ------------------------------------------------------------------ the Models table
def _model_rows() -> dict[str, str]:
    """model_type -> status, from the README's Models table."""
    text = README.read_text()
    table = text.split("| model_type | router | status |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.strip().splitlines()[1:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[2]
    return rows


def _parity_case_ids() -> list[str]:
    path = README.parent / "tests" / "loading" / "test_checkpoint_parity.py"
    spec = importlib.util.spec_from_file_location("checkpoint_parity_ids", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.CASE_IDS)


def test_every_served_family_in_the_models_table_has_a_parity_test():
    from moe_router.loading.checkpoint_families import FAMILIES

    rows = _model_rows()
    served = {name for name, status in rows.items() if status.startswith("parity-tested")}
    assert served == set(FAMILIES), ("README rows marked parity-tested must be exactly the "
                                     "mapped families", served ^ set(FAMILIES))
    ids = _parity_case_ids()
    for model_type, family in FAMILIES.items():
        for part in family.parts:
            wanted = model_type if part is family.parts[0] else f"{model_type}-{part.name}"
            assert wanted in ids, f"{wanted}: no parity test case"
    for name, status in rows.items():
        if name not in served:
            assert status.startswith("not supported"), f"{name}: say why it is not supported"


def test_the_models_table_lists_every_moe_family_of_the_installed_transformers():
    transformers = pytest.importorskip("transformers")
    models = Path(transformers.__file__).parent / "models"
    rows = set(_model_rows())
    marker = re.compile(r"num_experts|n_routed_experts|num_local_experts|moe_num_experts|"
                        r"num_experts_per_tok")
    missing = []
    for modeling in sorted(models.glob("*/modeling_*.py")):
        if not marker.search(modeling.read_text("utf-8")):
            continue
        family = modeling.parent.name
        configuration = modeling.parent / f"configuration_{family}.py"
        types = set(re.findall(r'model_type\s*=\s*"([^"]+)"', configuration.read_text("utf-8")))
        if not types & rows and family not in rows:
            missing.append(family)
    assert not missing, f"MoE families of transformers missing from the README table: {missing}"
