"""Generate the committed Python modules of our protos into the client package.

Two protos, each into its own subpackage of ``client/moe_router_client``:

- ``proto/moe_router/v1/router.proto`` -> ``v1/`` (our own contract);
- ``proto/inference/grpc_service.proto`` -> ``inference/`` (the Open Inference Protocol,
  KServe v2 with Triton's extensions).

Runs the pinned grpcio-tools protoc (``--python_out``, ``--grpc_python_out``,
``--pyi_out``) and makes two rewrites, each checked to apply exactly once:

- the absolute import protoc writes into ``*_pb2_grpc.py`` (``from moe_router.v1 import
  router_pb2``, which would name the *server* package; ``from inference import ...``,
  which names no package at all) points at ``moe_router_client.<subpackage>``;
- the inference module registers its file in a descriptor pool of its own instead of
  protobuf's default pool. tritonclient registers the same full names
  (``inference.ModelInferRequest``...) in the default pool from its own file, and two
  files defining one symbol in one pool fail to load ("duplicate symbol"); a process
  that holds both (our tests, a serving stack that runs us next to tritonclient) needs
  them apart. Messages of a private pool serialize and parse exactly as before.

``make proto`` runs it; ``tests/client/test_generated_fresh.py`` runs it into a temporary
folder and fails when the committed files differ.

    python scripts/gen_protos.py [--out DIR]   # DIR defaults to client/moe_router_client
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

__all__ = ["TARGETS", "Target", "PINNED_GRPCIO_TOOLS", "DEFAULT_OUT", "generate", "main"]

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "client" / "moe_router_client"
# Must equal the grpcio-tools pin in pyproject.toml (dev extra) and grpcio's floor.
PINNED_GRPCIO_TOOLS = "1.85.1"

_PRIVATE_POOL = (
    "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(",
    "DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile(",
)


@dataclass(frozen=True)
class Target:
    """One proto and the client subpackage its modules go to."""

    proto: str  # relative to PROTO_ROOT: also the file name in the descriptor
    subpackage: str  # folder under the output root, and the import path below it
    private_pool: bool = False

    @property
    def stem(self) -> str:
        """``router`` for ``moe_router/v1/router.proto``."""
        return Path(self.proto).stem

    @property
    def files(self) -> tuple[str, str, str]:
        """The three generated module names."""
        return (f"{self.stem}_pb2.py", f"{self.stem}_pb2_grpc.py", f"{self.stem}_pb2.pyi")

    @property
    def protoc_module(self) -> str:
        """The dotted path protoc's import uses (``moe_router.v1``, ``inference``)."""
        return str(Path(self.proto).parent).replace("/", ".")


TARGETS = (
    Target("moe_router/v1/router.proto", "v1"),
    Target("inference/grpc_service.proto", "inference", private_pool=True),
)


def _check_pin() -> None:
    """Refuse to generate with another grpcio-tools: its output (and version guard) differ."""
    installed = metadata.version("grpcio-tools")
    if installed != PINNED_GRPCIO_TOOLS:
        raise SystemExit(
            f"grpcio-tools {installed} is installed but the generated code is pinned to "
            f"{PINNED_GRPCIO_TOOLS}; run `make install` (or pip install "
            f"grpcio-tools=={PINNED_GRPCIO_TOOLS}) first"
        )


def _rewrite_once(path: Path, pattern: str, replacement: str, what: str) -> None:
    """Apply one regex rewrite that must match exactly once."""
    text = path.read_text()
    fixed, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise SystemExit(
            f"{path.name}: expected one {what} from protoc, found {count}; the generator's "
            "output changed, update gen_protos.py"
        )
    path.write_text(fixed)


def _fix_grpc_import(path: Path, target: Target) -> None:
    """Point ``*_pb2_grpc.py`` at ``moe_router_client.<subpackage>.<stem>_pb2``."""
    module = re.escape(target.protoc_module)
    _rewrite_once(
        path,
        rf"^from {module} import {target.stem}_pb2 as (\w+)$",
        rf"from moe_router_client.{target.subpackage} import {target.stem}_pb2 as \1",
        f"`from {target.protoc_module} import {target.stem}_pb2 as ...` line",
    )


def _use_private_pool(path: Path) -> None:
    """Register the file in a descriptor pool of its own (module docstring says why)."""
    old, new = _PRIVATE_POOL
    _rewrite_once(path, "^" + re.escape(old), new.replace("\\", "\\\\"), f"`{old}` line")


def _generate_one(target: Target, out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

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
            target.proto,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {PROTO_ROOT / target.proto} (its errors are above)")
        produced = Path(tmp) / Path(target.proto).parent
        written = []
        for name in target.files:
            destination = out_dir / name
            shutil.copyfile(produced / name, destination)
            written.append(destination)
    _fix_grpc_import(out_dir / target.files[1], target)
    if target.private_pool:
        _use_private_pool(out_dir / target.files[0])
    return written


def generate(out_root: Path) -> list[Path]:
    """Write every target's modules into ``out_root/<subpackage>``; return their paths."""
    _check_pin()
    written: list[Path] = []
    for target in TARGETS:
        written += _generate_one(target, out_root / target.subpackage)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``--out DIR`` (default: client/moe_router_client)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT,
        help=f"root of the generated subpackages (default {DEFAULT_OUT})",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
