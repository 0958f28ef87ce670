"""The committed generated modules are exactly what the pinned generator makes from the proto."""

from __future__ import annotations

import difflib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "client" / "moe_router_client"
COMMITTED = PACKAGE / "v1"


def _gen_protos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _floor(pyproject: str, name: str) -> tuple[int, ...]:
    """The version in a quoted ``"name>=X"`` / ``"name==X"`` requirement (tomllib is 3.11+)."""
    match = re.search(rf'"{re.escape(name)}\s*(?:>=|==)\s*([\d.]+)[^"]*"', pyproject)
    assert match, f"pyproject.toml has no '{name}>=' or '{name}==' requirement"
    return tuple(int(x) for x in match.group(1).split("."))


def test_committed_generated_files_match_the_protos(tmp_path: Path) -> None:
    gen = _gen_protos()
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert {t.subpackage for t in gen.TARGETS} == {"v1", "inference"}
    stale = []
    for target in gen.TARGETS:
        for name in target.files:
            fresh = (tmp_path / target.subpackage / name).read_text()
            committed_path = PACKAGE / target.subpackage / name
            committed = committed_path.read_text() if committed_path.exists() else ""
            if fresh != committed:
                diff = difflib.unified_diff(
                    committed.splitlines(), fresh.splitlines(),
                    f"committed/{target.subpackage}/{name}", f"fresh/{target.subpackage}/{name}",
                    lineterm="", n=1,
                )
                stale.append(f"{target.subpackage}/{name}:\n" + "\n".join(list(diff)[:20]))
    assert not stale, (
        "client/moe_router_client is stale against proto/; "
        "run `make proto` and commit the result.\n" + "\n".join(stale)
    )


def test_grpc_module_imports_messages_from_the_client_package() -> None:
    text = (COMMITTED / "router_pb2_grpc.py").read_text()
    assert "from moe_router_client.v1 import router_pb2 as" in text
    assert "from moe_router.v1" not in text  # that would name the server package
    text = (PACKAGE / "inference" / "grpc_service_pb2_grpc.py").read_text()
    assert "from moe_router_client.inference import grpc_service_pb2 as" in text
    assert "from inference import" not in text  # no such package


def test_inference_messages_live_in_a_pool_of_their_own() -> None:
    """tritonclient defines the same full names in the default pool; both must load."""
    from google.protobuf import descriptor_pool

    from moe_router_client.inference import grpc_service_pb2 as oip

    assert oip.DESCRIPTOR.pool is not descriptor_pool.Default()
    assert oip.DESCRIPTOR.package == "inference"
    import tritonclient.grpc.service_pb2 as triton  # would raise "duplicate symbol" otherwise

    assert triton.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"


def test_dependency_floors_match_the_generated_code() -> None:
    """pyproject pins the generator and requires runtimes at least as new as the gencode."""
    gen = _gen_protos()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"grpcio-tools=={gen.PINNED_GRPCIO_TOOLS}"' in pyproject
    for target in gen.TARGETS:
        grpc_text = (PACKAGE / target.subpackage / target.files[1]).read_text()
        grpc_generated = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_text)
        assert grpc_generated is not None
        assert grpc_generated.group(1) == gen.PINNED_GRPCIO_TOOLS
    assert _floor(pyproject, "grpcio") == tuple(int(x) for x in gen.PINNED_GRPCIO_TOOLS.split("."))
    pb2_text = (COMMITTED / "router_pb2.py").read_text()
    gencode = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", pb2_text)
    assert gencode is not None
    gencode_version = tuple(int(x) for x in gencode.groups())
    assert _floor(pyproject, "protobuf") >= gencode_version, (
        f"router_pb2.py refuses protobuf older than {gencode_version}; raise the floor"
    )
