"""Client for the moe-router gRPC service (grpcio, protobuf and numpy only; torch optional).

    from moe_router_client import RouterClient

    with RouterClient("127.0.0.1:50051", timeout=5.0) as client:
        result = client.route("mixtral", hidden_states, layer=3)  # [T, D] numpy or torch
        result.expert_indices, result.expert_weights               # [T, k_max]

On the server's host, ``CoLocatedClient`` (and ``AsyncCoLocatedClient``) route the same
calls through shared memory and a unix socket, falling back to gRPC elsewhere.

Importing this package never imports torch: the codec imports it only when it is given a
torch tensor or asked for torch output (``as_torch=True``).
"""

from moe_router_client.client import AsyncRouterClient, RouterClient
from moe_router_client.colocated import CoLocatedClient
from moe_router_client.colocated_async import AsyncCoLocatedClient
from moe_router_client.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RouterError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
)
from moe_router_client.results import (
    BreakerStats,
    CacheStats,
    HealthReport,
    LatencySummary,
    LayerLoad,
    RouteInfo,
    RouteResult,
    RouterHealth,
    RouterInfo,
    RouterStats,
)
from moe_router_client.tensors import DType, TensorCodecError, from_wire, to_wire

__all__ = [
    # clients
    "RouterClient",
    "AsyncRouterClient",
    "CoLocatedClient",
    "AsyncCoLocatedClient",
    # results
    "RouteResult",
    "RouteInfo",
    "RouterStats",
    "LatencySummary",
    "CacheStats",
    "BreakerStats",
    "LayerLoad",
    "HealthReport",
    "RouterHealth",
    "RouterInfo",
    # errors
    "RouterError",
    "InvalidArgumentError",
    "NotFoundError",
    "UnavailableError",
    "ResourceExhaustedError",
    "DeadlineExceededError",
    "UnauthenticatedError",
    "InternalError",
    "error_from_rpc",
    # wire codec
    "DType",
    "TensorCodecError",
    "to_wire",
    "from_wire",
]
