"""Generate the committed Python modules of moe_router.v1 from proto/moe_router/v1/router.proto.

Runs the pinned grpcio-tools protoc (``--python_out``, ``--grpc_python_out``, ``--pyi_out``)
and rewrites the one absolute import protoc writes into ``router_pb2_grpc.py``
(``from moe_router.v1 import router_pb2``, which would name the *server* package) to
``moe_router_client.v1``. ``make proto`` runs it; ``tests/client/test_generated_fresh.py``
runs it into a temporary folder and fails when the committed files differ.

    python scripts/gen_protos.py [--out DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from importlib import metadata, resources
from pathlib import Path

__all__ = ["GENERATED_FILES", "PINNED_GRPCIO_TOOLS", "DEFAULT_OUT", "generate", "main"]

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = "moe_router/v1/router.proto"  # relative to PROTO_ROOT: the descriptor's file name
DEFAULT_OUT = ROOT / "client" / "moe_router_client" / "v1"
GENERATED_FILES = ("router_pb2.py", "router_pb2_grpc.py", "router_pb2.pyi")
# Must equal the grpcio-tools pin in pyproject.toml (dev extra) and grpcio's floor.
PINNED_GRPCIO_TOOLS = "1.85.1"

_PROTOC_IMPORT = re.compile(r"^from moe_router\.v1 import router_pb2 as (\w+)$", re.MULTILINE)
_PACKAGE_IMPORT = r"from moe_router_client.v1 import router_pb2 as \1"


def _check_pin() -> None:
    """Refuse to generate with another grpcio-tools: its output (and version guard) differ."""
    installed = metadata.version("grpcio-tools")
    if installed != PINNED_GRPCIO_TOOLS:
        raise SystemExit(
            f"grpcio-tools {installed} is installed but the generated code is pinned to "
            f"{PINNED_GRPCIO_TOOLS}; run `make install` (or pip install "
            f"grpcio-tools=={PINNED_GRPCIO_TOOLS}) first"
        )


def _fix_grpc_import(path: Path) -> None:
    """Point router_pb2_grpc.py at ``moe_router_client.v1.router_pb2``."""
    text = path.read_text()
    fixed, count = _PROTOC_IMPORT.subn(_PACKAGE_IMPORT, text)
    if count != 1:
        raise SystemExit(
            f"{path.name}: expected one `from moe_router.v1 import router_pb2 as ...` line from "
            f"protoc, found {count}; the generator's output changed, update gen_protos.py"
        )
    path.write_text(fixed)


def generate(out_dir: Path) -> list[Path]:
    """Write the three generated modules into ``out_dir`` and return their paths."""
    from grpc_tools import protoc

    _check_pin()
    well_known = resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gen_protos_") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--pyi_out={tmp}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {PROTO_ROOT / PROTO_FILE} (its errors are above)")
        produced = Path(tmp) / Path(PROTO_FILE).parent
        written = []
        for name in GENERATED_FILES:
            target = out_dir / name
            shutil.copyfile(produced / name, target)
            written.append(target)
    _fix_grpc_import(out_dir / "router_pb2_grpc.py")
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``--out DIR`` (default: client/moe_router_client/v1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
