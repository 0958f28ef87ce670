"""The co-located door's messages as values: one frozen dataclass per message kind, the
limits both sides enforce, the output layout and the default socket path. Their bytes
are :mod:`moe_router_client.colocated_wire`'s (which re-exports these names).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from moe_router_client.frozen_init import fast_init

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_MESSAGE_BYTES",
    "MAX_ERROR_CHARS",
    "MAX_STRING_BYTES",
    "MAX_DIMS",
    "ALIGNMENT",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "Kind",
    "RegionRef",
    "CudaIpcRef",
    "TensorRef",
    "Hello",
    "Welcome",
    "Register",
    "Unregister",
    "Describe",
    "Description",
    "Route",
    "OutputRef",
    "Routed",
    "Error",
    "Ok",
    "Message",
    "aligned",
    "output_bytes_bound",
    "default_socket_path",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
"""Largest datagram either side sends or reads (inline tensors included)."""
MAX_ERROR_CHARS = 2000
ALIGNMENT = 64
MAX_STRING_BYTES = 4096
MAX_DIMS = 8

INPUT_NAMES = (
    "hidden_states", "attention_weights", "logits", "gradients", "input_ids",
)
"""The inputs a ROUTE may carry, by slot; ``input_ids`` (int32/int64, hidden_states'
leading dims) are a hash router's token ids and always travel as host bytes."""
OUTPUT_NAMES = (
    "expert_indices", "expert_weights", "num_experts_per_token", "complexity_scores",
    "router_logits", "dispatch_weights", "combine_weights", "expert_tokens",
    "expert_token_weights",
)


class Kind(IntEnum):
    """The first byte of every message."""

    HELLO = 1
    REGISTER = 2
    UNREGISTER = 3
    DESCRIBE = 4
    ROUTE = 5
    OK = 16
    WELCOME = 17
    DESCRIPTION = 18
    ROUTED = 19
    ERROR = 20


@fast_init
@dataclass(frozen=True)
class RegionRef:
    """Bytes ``[offset, offset + byte_size)`` of the registered region ``name``."""

    name: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class CudaIpcRef:
    """A CUDA tensor shared by its IPC handle (the fields ``torch.multiprocessing``'s
    ``reduce_tensor`` produces for a CUDA storage; rebuilt without pickle)."""

    device: int
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    tensor_offset: int
    """In elements, from the storage's start."""
    stride: tuple[int, ...]
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


@fast_init
@dataclass(frozen=True)
class TensorRef:
    """One input: where its bytes are (inline in the message, a region, a CUDA handle)."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    place: RegionRef | CudaIpcRef | None
    """None: inline, ``data`` holds the bytes."""
    data: bytes | memoryview = b""


@dataclass(frozen=True)
class Hello:
    seq: int
    api_key: str
    pid: int
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Welcome:
    seq: int
    server_version: str
    device: str
    """Where the server routes (``cpu``, ``cuda:0``): CUDA IPC needs a CUDA server."""
    inline_limit: int
    """Inputs of at most this many bytes may go inline in ROUTE (the server's receive
    buffer bounds it)."""
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Register:
    seq: int
    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class Unregister:
    seq: int
    name: str


@dataclass(frozen=True)
class Describe:
    seq: int
    router: str


@dataclass(frozen=True)
class Description:
    """What a client needs to size an output region for ``router``."""

    seq: int
    router: str
    layers: int
    input_dim: int
    num_experts: int
    k_max: int
    extra_columns: int
    """float32 values per token beyond the three fixed outputs and router_logits
    (complexity score, Soft MoE dispatch and combine weights)."""


@fast_init
@dataclass(frozen=True)
class Route:
    seq: int
    router: str
    layer: int
    output: RegionRef
    tensors: tuple[TensorRef, ...]
    request_id: str = ""
    return_router_logits: bool = False
    skip_cache: bool = False
    seed: int | None = None
    timeout_s: float | None = None
    return_losses: bool = False
    """Compute the call's aux and z losses (``RouteOptions.return_losses``)."""


@fast_init
@dataclass(frozen=True)
class OutputRef:
    """One output written into the output region, at ``offset`` from the ref's offset."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@fast_init
@dataclass(frozen=True)
class Routed:
    seq: int
    outputs: tuple[OutputRef, ...]
    tokens_per_expert: tuple[int, ...]
    dropped_tokens: int
    router_version: str
    cache_hit: bool
    batch_requests: int
    batch_tokens: int
    queue_time_us: int
    compute_time_us: int
    request_id: str
    layer: int
    aux_loss: float | None = None
    z_loss: float | None = None


@dataclass(frozen=True)
class Error:
    seq: int
    code: str
    """A ``grpc.StatusCode`` name."""
    message: str
    reason: str = ""
    retry_after_s: float | None = None
    error: str = ""
    """The server's error class name."""
    request_id: str = ""


@dataclass(frozen=True)
class Ok:
    seq: int


Message = (
    Hello | Welcome | Register | Unregister | Describe | Description | Route | Routed | Error
    | Ok
)

def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to :data:`ALIGNMENT`."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def output_bytes_bound(tokens: int, description: Description, router_logits: bool) -> int:
    """Bytes an output region needs for ``tokens`` tokens of ``description``'s router:
    indices and weights ``[T, k]``, counts ``[T]``, the extra columns and, when asked,
    router_logits ``[T, E]`` (4 bytes a value), each output 64-byte aligned."""
    fixed = 2 * aligned(4 * tokens * description.k_max) + aligned(4 * tokens)
    extra = 4 * tokens * description.extra_columns + 3 * ALIGNMENT
    logits = aligned(4 * tokens * description.num_experts) if router_logits else 0
    return fixed + extra + logits


def default_socket_path(port: int, uid: int) -> Path:
    """Where a server whose gRPC port is ``port`` listens for co-located callers when
    ``colocated.socket_path`` is not set: ``/tmp/moe-router-<uid>/colocated-<port>.sock``
    (the directory 0700, the server's user's own)."""
    return Path("/tmp") / f"moe-router-{uid}" / f"colocated-{port}.sock"
