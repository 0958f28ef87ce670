from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]

class ServingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_STATUS_UNSPECIFIED: _ClassVar[ServingStatus]
    SERVING: _ClassVar[ServingStatus]
    NOT_SERVING: _ClassVar[ServingStatus]
    DEGRADED: _ClassVar[ServingStatus]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT32: DType
INT64: DType
SERVING_STATUS_UNSPECIFIED: ServingStatus
SERVING: ServingStatus
NOT_SERVING: ServingStatus
DEGRADED: ServingStatus

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("router", "layer", "hidden_states", "attention_weights", "logits", "gradients", "return_router_logits", "skip_cache", "seed", "request_id", "input_ids", "return_losses")
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_ROUTER_LOGITS_FIELD_NUMBER: _ClassVar[int]
    SKIP_CACHE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOSSES_FIELD_NUMBER: _ClassVar[int]
    router: str
    layer: int
    hidden_states: Tensor
    attention_weights: Tensor
    logits: Tensor
    gradients: Tensor
    return_router_logits: bool
    skip_cache: bool
    seed: int
    request_id: str
    input_ids: Tensor
    return_losses: bool
    def __init__(self, router: _Optional[str] = ..., layer: _Optional[int] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., attention_weights: _Optional[_Union[Tensor, _Mapping]] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., gradients: _Optional[_Union[Tensor, _Mapping]] = ..., return_router_logits: _Optional[bool] = ..., skip_cache: _Optional[bool] = ..., seed: _Optional[int] = ..., request_id: _Optional[str] = ..., input_ids: _Optional[_Union[Tensor, _Mapping]] = ..., return_losses: _Optional[bool] = ...) -> None: ...

class RoutingInfo(_message.Message):
    __slots__ = ("aux_loss", "z_loss", "tokens_per_expert", "dropped_tokens", "router_version", "cache_hit", "batch_requests", "batch_tokens", "queue_time_us", "compute_time_us", "request_id", "layer")
    AUX_LOSS_FIELD_NUMBER: _ClassVar[int]
    Z_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TIME_US_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    aux_loss: float
    z_loss: float
    tokens_per_expert: _containers.RepeatedScalarFieldContainer[int]
    dropped_tokens: int
    router_version: str
    cache_hit: bool
    batch_requests: int
    batch_tokens: int
    queue_time_us: int
    compute_time_us: int
    request_id: str
    layer: int
    def __init__(self, aux_loss: _Optional[float] = ..., z_loss: _Optional[float] = ..., tokens_per_expert: _Optional[_Iterable[int]] = ..., dropped_tokens: _Optional[int] = ..., router_version: _Optional[str] = ..., cache_hit: _Optional[bool] = ..., batch_requests: _Optional[int] = ..., batch_tokens: _Optional[int] = ..., queue_time_us: _Optional[int] = ..., compute_time_us: _Optional[int] = ..., request_id: _Optional[str] = ..., layer: _Optional[int] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("expert_indices", "expert_weights", "num_experts_per_token", "complexity_scores", "router_logits", "info", "dispatch_weights", "combine_weights", "expert_tokens", "expert_token_weights")
    EXPERT_INDICES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COMPLEXITY_SCORES_FIELD_NUMBER: _ClassVar[int]
    ROUTER_LOGITS_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    COMBINE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKEN_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    expert_indices: Tensor
    expert_weights: Tensor
    num_experts_per_token: Tensor
    complexity_scores: Tensor
    router_logits: Tensor
    info: RoutingInfo
    dispatch_weights: Tensor
    combine_weights: Tensor
    expert_tokens: Tensor
    expert_token_weights: Tensor
    def __init__(self, expert_indices: _Optional[_Union[Tensor, _Mapping]] = ..., expert_weights: _Optional[_Union[Tensor, _Mapping]] = ..., num_experts_per_token: _Optional[_Union[Tensor, _Mapping]] = ..., complexity_scores: _Optional[_Union[Tensor, _Mapping]] = ..., router_logits: _Optional[_Union[Tensor, _Mapping]] = ..., info: _Optional[_Union[RoutingInfo, _Mapping]] = ..., dispatch_weights: _Optional[_Union[Tensor, _Mapping]] = ..., combine_weights: _Optional[_Union[Tensor, _Mapping]] = ..., expert_tokens: _Optional[_Union[Tensor, _Mapping]] = ..., expert_token_weights: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("router",)
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    router: str
    def __init__(self, router: _Optional[str] = ...) -> None: ...

class LatencySummary(_message.Message):
    __slots__ = ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "samples")
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    samples: int
    def __init__(self, p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., mean_ms: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class CacheStats(_message.Message):
    __slots__ = ("size", "max_size", "hit_count", "miss_count", "hit_rate", "ttl_seconds", "bytes", "max_bytes", "evictions")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIT_COUNT_FIELD_NUMBER: _ClassVar[int]
    MISS_COUNT_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    size: int
    max_size: int
    hit_count: int
    miss_count: int
    hit_rate: float
    ttl_seconds: float
    bytes: int
    max_bytes: int
    evictions: int
    def __init__(self, size: _Optional[int] = ..., max_size: _Optional[int] = ..., hit_count: _Optional[int] = ..., miss_count: _Optional[int] = ..., hit_rate: _Optional[float] = ..., ttl_seconds: _Optional[float] = ..., bytes: _Optional[int] = ..., max_bytes: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class BreakerStats(_message.Message):
    __slots__ = ("state", "failure_rate", "slow_call_rate", "rejected_calls", "transitions", "retry_after_s")
    STATE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_RATE_FIELD_NUMBER: _ClassVar[int]
    SLOW_CALL_RATE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_CALLS_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    state: str
    failure_rate: float
    slow_call_rate: float
    rejected_calls: int
    transitions: int
    retry_after_s: float
    def __init__(self, state: _Optional[str] = ..., failure_rate: _Optional[float] = ..., slow_call_rate: _Optional[float] = ..., rejected_calls: _Optional[int] = ..., transitions: _Optional[int] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class LayerLoad(_message.Message):
    __slots__ = ("layer", "tokens_per_expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tokens_per_expert: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., tokens_per_expert: _Optional[_Iterable[int]] = ...) -> None: ...

class RouterStats(_message.Message):
    __slots__ = ("router", "requests", "tokens", "errors", "tokens_per_expert", "load_balance_score", "usage_variance", "most_used_expert", "least_used_expert", "avg_experts_per_token", "dropped_tokens", "latency", "cache", "breaker", "layers")
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    LOAD_BALANCE_SCORE_FIELD_NUMBER: _ClassVar[int]
    USAGE_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    MOST_USED_EXPERT_FIELD_NUMBER: _ClassVar[int]
    LEAST_USED_EXPERT_FIELD_NUMBER: _ClassVar[int]
    AVG_EXPERTS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    router: str
    requests: int
    tokens: int
    errors: int
    tokens_per_expert: _containers.RepeatedScalarFieldContainer[int]
    load_balance_score: float
    usage_variance: float
    most_used_expert: int
    least_used_expert: int
    avg_experts_per_token: float
    dropped_tokens: int
    latency: LatencySummary
    cache: CacheStats
    breaker: BreakerStats
    layers: _containers.RepeatedCompositeFieldContainer[LayerLoad]
    def __init__(self, router: _Optional[str] = ..., requests: _Optional[int] = ..., tokens: _Optional[int] = ..., errors: _Optional[int] = ..., tokens_per_expert: _Optional[_Iterable[int]] = ..., load_balance_score: _Optional[float] = ..., usage_variance: _Optional[float] = ..., most_used_expert: _Optional[int] = ..., least_used_expert: _Optional[int] = ..., avg_experts_per_token: _Optional[float] = ..., dropped_tokens: _Optional[int] = ..., latency: _Optional[_Union[LatencySummary, _Mapping]] = ..., cache: _Optional[_Union[CacheStats, _Mapping]] = ..., breaker: _Optional[_Union[BreakerStats, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerLoad, _Mapping]]] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("routers",)
    ROUTERS_FIELD_NUMBER: _ClassVar[int]
    routers: _containers.RepeatedCompositeFieldContainer[RouterStats]
    def __init__(self, routers: _Optional[_Iterable[_Union[RouterStats, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouterHealth(_message.Message):
    __slots__ = ("router", "status", "detail")
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    router: str
    status: ServingStatus
    detail: str
    def __init__(self, router: _Optional[str] = ..., status: _Optional[_Union[ServingStatus, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "routers", "device", "version", "uptime_s")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUTERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    status: ServingStatus
    routers: _containers.RepeatedCompositeFieldContainer[RouterHealth]
    device: str
    version: str
    uptime_s: float
    def __init__(self, status: _Optional[_Union[ServingStatus, str]] = ..., routers: _Optional[_Iterable[_Union[RouterHealth, _Mapping]]] = ..., device: _Optional[str] = ..., version: _Optional[str] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class ListRoutersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouterDescription(_message.Message):
    __slots__ = ("name", "kind", "num_experts", "layers", "input_dim", "min_k", "max_k", "accepted_dtypes", "version", "batches_across_requests")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    MIN_K_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DTYPES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BATCHES_ACROSS_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    num_experts: int
    layers: int
    input_dim: int
    min_k: int
    max_k: int
    accepted_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    version: str
    batches_across_requests: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., num_experts: _Optional[int] = ..., layers: _Optional[int] = ..., input_dim: _Optional[int] = ..., min_k: _Optional[int] = ..., max_k: _Optional[int] = ..., accepted_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., version: _Optional[str] = ..., batches_across_requests: _Optional[bool] = ...) -> None: ...

class ListRoutersResponse(_message.Message):
    __slots__ = ("routers",)
    ROUTERS_FIELD_NUMBER: _ClassVar[int]
    routers: _containers.RepeatedCompositeFieldContainer[RouterDescription]
    def __init__(self, routers: _Optional[_Iterable[_Union[RouterDescription, _Mapping]]] = ...) -> None: ...
