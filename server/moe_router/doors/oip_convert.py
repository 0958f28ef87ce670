"""Open Inference Protocol <-> domain: a ModelInferRequest becomes the same ``RouteCall``
Route decodes, a ``RouteResult`` becomes a ModelInferResponse.

Each hosted router is a model; the MoE layer is the request parameter ``layer`` (default
0) or the model name ``router/layer`` (``mixtral/3``), for clients that cannot set request
parameters. Inputs: ``hidden_states`` (FP32, FP16 or BF16, [tokens, dim] or [batch, seq,
dim]) and, for dynamic routers, the estimator inputs ``attention_weights``, ``logits``
and ``gradients``; each either in ``raw_input_contents`` (a view of the received bytes:
:func:`parse_infer_request` splits them out before protobuf would copy them), in
``contents.fp32_contents``, or in a registered shared-memory region (a view of the mapped
file). Outputs (``oip_models.model_outputs``) come in the order requested, all of them when none
is named; each is in ``raw_output_contents`` or written into the output region named.

Tensor bytes are produced by the same codec as Route's (``to_parts``), so the two doors
answer the same bits. Request parameters: ``layer``, ``skip_cache``, ``return_losses``
(bool: answer the aux and z losses, as Route's field), ``seed`` and Triton's ``timeout``
(microseconds; shortens the deadline); ``priority`` is accepted and ignored
(one queue), anything else is refused so that a misspelt option is not silently lost.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from moe_router.chain.backend import AT_ONCE, AfterAnswer, RouteCall, RouteOptions, RouteResult
from moe_router.chain.hosted import HostedRouterChain
from moe_router.doors.oip_models import model_outputs, resolve_model
from moe_router.doors.request_wire import split_repeated_bytes
from moe_router.doors.rpc_errors import new_request_id
from moe_router.doors.shm_regions import SharedMemoryRegistry
from moe_router.errors import NotFoundError, ValidationError
from moe_router_client.inference import grpc_service_pb2 as oip
from moe_router_client.tensors import TensorCodecError, from_parts, to_parts
from moe_router_client.v1 import router_pb2 as wire

__all__ = [
    "DATATYPES",
    "InferRequestView",
    "RequestedOutput",
    "model_statistics",
    "parse_infer_request",
    "request_to_call",
    "result_to_response",
]

#: Open Inference Protocol datatype <-> our wire dtype (the ones our codec carries).
DATATYPES: dict[str, int] = {
    "FP32": wire.FLOAT32, "FP16": wire.FLOAT16, "BF16": wire.BFLOAT16,
    "INT32": wire.INT32, "INT64": wire.INT64,
}
_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}
_FLOATS = ("FP32", "FP16", "BF16")
_ESTIMATOR_INPUTS = ("attention_weights", "logits", "gradients")
_SHM_REGION, _SHM_OFFSET, _SHM_SIZE = (
    "shared_memory_region", "shared_memory_offset", "shared_memory_byte_size",
)
_REQUEST_PARAMETERS = ("layer", "skip_cache", "return_losses", "seed", "timeout", "priority")
_BOOL_PARAMETERS = ("skip_cache", "return_losses")
_RAW_INPUTS = oip.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number


# ---------------------------------------------------------------- requests
@dataclass(frozen=True)
class InferRequestView:
    """A ModelInferRequest whose ``raw_input_contents`` are views of the received bytes
    (``message`` holds every other field); ``error`` is set when the bytes are no
    ModelInferRequest, so the handler answers INVALID_ARGUMENT. ``nbytes``: the size of
    the received message (what admission control counts)."""

    message: oip.ModelInferRequest
    raw_inputs: tuple[memoryview, ...] = ()
    error: str = ""
    nbytes: int = 0


def parse_infer_request(raw: bytes) -> InferRequestView:
    """Decode a serialized ModelInferRequest, its tensor payloads left in place."""
    try:
        rest, payloads = split_repeated_bytes(raw, _RAW_INPUTS)
        return InferRequestView(oip.ModelInferRequest.FromString(rest), tuple(payloads),
                                nbytes=len(raw))
    except Exception as exc:  # any decoding failure is the caller's malformed request
        return InferRequestView(oip.ModelInferRequest(), (), f"malformed ModelInferRequest: {exc}",
                                len(raw))


@dataclass(frozen=True)
class RequestedOutput:
    """One output to answer, and the shared-memory region to write it into (if any)."""

    name: str
    region: str | None = None
    offset: int = 0
    byte_size: int = 0


def request_to_call(
    request: InferRequestView,
    chains: Mapping[str, HostedRouterChain],
    regions: SharedMemoryRegistry,
    *,
    owner: str,
    peer: str,
    time_remaining: float | None,
    after_answer: AfterAnswer = AT_ONCE,
) -> tuple[RouteCall, list[RequestedOutput]]:
    """The RouteCall Route would make of the same tensors and options, and the outputs
    to answer. ``owner`` names the caller's shared-memory regions, ``peer`` its rate-limit
    identity; ``time_remaining`` is the gRPC deadline's; ``after_answer``: the call's
    records the door runs once it has sent the answer."""
    if request.error:
        raise ValidationError(request.error)
    message = request.message
    ref = resolve_model(message.model_name, chains)
    chain = chains[ref.router]
    parameters = _request_parameters(message)
    layer = parameters.get("layer", ref.layer if ref.layer is not None else 0)
    if ref.layer is not None and layer != ref.layer:
        raise ValidationError(
            f"parameter layer={layer} contradicts model '{message.model_name}'; give one"
        )
    versions = chain.hosted.versions
    if message.model_version and not (
        0 <= layer < len(versions) and message.model_version == versions[layer]
    ):
        raise NotFoundError(
            f"model '{message.model_name}' has no version '{message.model_version[:100]}'; "
            f"leave it empty or send {sorted(set(versions))}"
        )
    first = chain.hosted.layers[0]
    tensors = _inputs(request, regions, owner, first.accepts_estimator_inputs,
                      first.takes_input_ids)
    outputs = _requested_outputs(message, chain, regions, owner)
    deadline = None if time_remaining is None else time.monotonic() + time_remaining
    if "timeout" in parameters:
        until = time.monotonic() + parameters["timeout"] / 1e6
        deadline = until if deadline is None else min(deadline, until)
    hidden = tensors.pop("hidden_states")
    input_ids = tensors.pop("input_ids", None)
    if input_ids is not None:
        # A copy: the ids index the hash table, and a caller could rewrite its shared
        # memory region between the device stage's range check and the lookup.
        input_ids = input_ids.clone()
    call = RouteCall(
        router=ref.router,
        layer=layer,
        hidden_states=hidden,
        options=RouteOptions(
            return_router_logits=any(o.name == "router_logits" for o in outputs),
            return_losses=bool(parameters.get("return_losses", False)),
            skip_cache=bool(parameters.get("skip_cache", False)),
            seed=parameters.get("seed"),
            extra_inputs=tensors,
            input_ids=input_ids,
        ),
        deadline=deadline,
        request_id=message.id or new_request_id(),
        peer=peer,
        after_answer=after_answer,
    )
    return call, outputs


def _request_parameters(message: oip.ModelInferRequest) -> dict[str, int]:
    values: dict[str, int] = {}
    for key, value in message.parameters.items():
        if key not in _REQUEST_PARAMETERS:
            raise ValidationError(
                f"request parameter '{key[:100]}' is not one this server reads; "
                f"expected {list(_REQUEST_PARAMETERS)}"
            )
        if key in _BOOL_PARAMETERS:
            values[key] = int(_bool(value, key))
        elif key != "priority":
            number = _integer(value, key)
            if number < 0:
                raise ValidationError(f"request parameter {key}={number}: expected >= 0")
            values[key] = number
    return values


def _integer(value: oip.InferParameter, name: str) -> int:
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise ValidationError(f"parameter {name}: expected an integer, got {kind or 'nothing'}")
    return int(getattr(value, kind))


def _bool(value: oip.InferParameter, name: str) -> bool:
    if value.WhichOneof("parameter_choice") != "bool_param":
        raise ValidationError(f"parameter {name}: expected a bool")
    return value.bool_param


def _shm_reference(
    parameters: Mapping[str, oip.InferParameter], what: str
) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) when ``parameters`` name a region, else None."""
    allowed = (_SHM_REGION, _SHM_OFFSET, _SHM_SIZE, "binary_data", "binary_data_size")
    for key in parameters:
        if key not in allowed:
            raise ValidationError(
                f"{what}: parameter '{key[:100]}' is not one this server reads; expected "
                f"{list(allowed[:3])}"
            )
    if _SHM_REGION not in parameters:
        return None
    region = parameters[_SHM_REGION]
    if region.WhichOneof("parameter_choice") != "string_param" or not region.string_param:
        raise ValidationError(f"{what}: {_SHM_REGION} must name a registered region")
    if _SHM_SIZE not in parameters:
        raise ValidationError(f"{what}: {_SHM_SIZE} is required with {_SHM_REGION}")
    offset = _integer(parameters[_SHM_OFFSET], _SHM_OFFSET) if _SHM_OFFSET in parameters else 0
    return region.string_param, offset, _integer(parameters[_SHM_SIZE], _SHM_SIZE)


def _inputs(
    request: InferRequestView, regions: SharedMemoryRegistry, owner: str, estimators: bool,
    token_ids: bool = False,
) -> dict[str, torch.Tensor]:
    """Every input tensor by name, as a view of its bytes (received or in shared memory).

    ``input_ids`` (INT32/INT64, hidden_states' leading dims) is accepted for routers that
    route by token id; the device stage checks its shape and values, as for Route."""
    accepted = ("hidden_states", *_ESTIMATOR_INPUTS) if estimators else ("hidden_states",)
    if token_ids:
        accepted = (*accepted, "input_ids")
    raw = request.raw_inputs
    raw_used = 0
    tensors: dict[str, torch.Tensor] = {}
    for tensor in request.message.inputs:
        name = tensor.name
        if name not in accepted:
            raise ValidationError(
                f"unexpected input '{name[:100]}'; this model takes {list(accepted)}"
            )
        if name in tensors:
            raise ValidationError(f"input '{name}' appears more than once")
        allowed = _FLOATS if name == "hidden_states" else tuple(DATATYPES)
        if tensor.datatype not in allowed:
            raise ValidationError(
                f"input '{name}': datatype '{tensor.datatype[:20]}' is not accepted; expected "
                f"one of {list(allowed)}"
            )
        dtype = DATATYPES[tensor.datatype]
        shm = _shm_reference(tensor.parameters, f"input '{name}'")
        data: bytes | memoryview
        if shm is not None:
            region, offset, byte_size = shm
            data = regions.view(region, offset, byte_size, owner=owner)
        elif raw:
            if tensor.HasField("contents"):
                raise ValidationError(
                    f"input '{name}': contents and raw_input_contents cannot be mixed"
                )
            if raw_used >= len(raw):
                raise ValidationError(
                    f"raw_input_contents has {len(raw)} entries, fewer than the inputs not in "
                    "shared memory"
                )
            data = raw[raw_used]
            raw_used += 1
        else:
            data = _typed_contents(tensor, name)
        try:
            tensors[name] = from_parts(dtype, tensor.shape, data, as_torch=True)
        except TensorCodecError as exc:
            raise ValidationError(f"input '{name}': {exc}") from exc
    if raw_used != len(raw):
        raise ValidationError(
            f"raw_input_contents has {len(raw)} entries but {raw_used} inputs take one; "
            "send one per input not in shared memory, in the order of inputs"
        )
    if "hidden_states" not in tensors:
        raise ValidationError(
            "input 'hidden_states' is required, [tokens, dim] or [batch, seq, dim]"
        )
    return tensors


def _typed_contents(tensor: oip.ModelInferRequest.InferInputTensor, name: str) -> bytes:
    """The bytes of an input sent as InferTensorContents (FP32, INT32, INT64 only)."""
    contents = tensor.contents
    fields = {"FP32": ("fp32_contents", np.float32), "INT32": ("int_contents", np.int32),
              "INT64": ("int64_contents", np.int64)}
    if tensor.datatype not in fields:
        raise ValidationError(
            f"input '{name}': {tensor.datatype} data must come in raw_input_contents or shared "
            "memory (InferTensorContents has no field for it)"
        )
    field, np_dtype = fields[tensor.datatype]
    values = getattr(contents, field)
    if not values and not tensor.HasField("contents"):
        raise ValidationError(
            f"input '{name}' has no data: send raw_input_contents, contents or a shared "
            "memory region"
        )
    return np.asarray(values, dtype=np.dtype(np_dtype).newbyteorder("<")).tobytes()


def _requested_outputs(
    message: oip.ModelInferRequest,
    chain: HostedRouterChain,
    regions: SharedMemoryRegistry,
    owner: str,
) -> list[RequestedOutput]:
    available = [name for name, _, _ in model_outputs(chain)]
    if not message.outputs:
        return [RequestedOutput(name) for name in available]
    wanted: list[RequestedOutput] = []
    for output in message.outputs:
        if output.name not in available:
            raise ValidationError(
                f"unexpected output '{output.name[:100]}'; model '{message.model_name}' "
                f"outputs {available}"
            )
        if any(o.name == output.name for o in wanted):
            raise ValidationError(f"output '{output.name}' is requested more than once")
        if "classification" in output.parameters:
            raise ValidationError(f"output '{output.name}': classification is not supported")
        shm = _shm_reference(output.parameters, f"output '{output.name}'")
        if shm is None:
            wanted.append(RequestedOutput(output.name))
            continue
        region, offset, byte_size = shm
        regions.view(region, offset, byte_size, owner=owner)  # a bad reference fails now
        wanted.append(RequestedOutput(output.name, region, offset, byte_size))
    return wanted


# ---------------------------------------------------------------- responses
def _output_array(result: RouteResult, name: str) -> tuple[str, np.ndarray] | None:
    """(datatype, array) of output ``name`` as Route's codec lays it out (None when the
    router has none)."""
    tensor = getattr(result.output, name)
    if tensor is None:
        return None
    if name in ("router_logits", "complexity_scores", "dispatch_weights", "combine_weights"):
        tensor = tensor.float()  # as Route sends them
    dtype, _, array = to_parts(tensor)
    return _DATATYPE_OF[dtype], array


def result_to_response(
    result: RouteResult,
    call: RouteCall,
    request: oip.ModelInferRequest,
    outputs: list[RequestedOutput],
    regions: SharedMemoryRegistry,
    owner: str,
) -> oip.ModelInferResponse:
    """Encode ``result``: one raw_output_contents entry per output, in ``outputs`` order
    (empty for an output written into shared memory, as Triton answers)."""
    response = oip.ModelInferResponse(
        model_name=request.model_name, model_version=result.router_version, id=request.id
    )
    for wanted in outputs:
        produced = _output_array(result, wanted.name)
        if produced is None:
            raise ValidationError(f"router '{call.router}' produced no '{wanted.name}'")
        datatype, array = produced
        entry = response.outputs.add(name=wanted.name, datatype=datatype, shape=array.shape)
        if wanted.region is None:
            response.raw_output_contents.append(array.tobytes())
            continue
        if array.nbytes > wanted.byte_size:
            raise ValidationError(
                f"output '{wanted.name}': shared memory region '{wanted.region}' gives "
                f"{wanted.byte_size} bytes, the result needs {array.nbytes}"
            )
        regions.write(wanted.region, wanted.offset, array.data, owner=owner)
        entry.parameters[_SHM_REGION].string_param = wanted.region
        entry.parameters[_SHM_SIZE].int64_param = array.nbytes
        if wanted.offset:
            entry.parameters[_SHM_OFFSET].int64_param = wanted.offset
        response.raw_output_contents.append(b"")
    _routing_parameters(response, result, call)
    return response


def _routing_parameters(
    response: oip.ModelInferResponse, result: RouteResult, call: RouteCall
) -> None:
    """What Route's RoutingInfo says, as response parameters."""
    p = response.parameters
    out = result.output
    p["router_version"].string_param = result.router_version
    p["request_id"].string_param = call.request_id
    p["cache_hit"].bool_param = result.cache_hit
    for key, value in (
        ("layer", call.layer), ("dropped_tokens", out.dropped_tokens),
        ("batch_requests", result.batch_requests), ("batch_tokens", result.batch_tokens),
        ("queue_time_us", result.queue_time_us), ("compute_time_us", result.compute_time_us),
    ):
        p[key].int64_param = int(value)
    if out.aux_loss is not None:
        p["aux_loss"].double_param = float(out.aux_loss)
    if out.z_loss is not None:
        p["z_loss"].double_param = float(out.z_loss)


# ---------------------------------------------------------------- statistics
def model_statistics(name: str, chain: HostedRouterChain) -> oip.ModelStatistics:
    """Triton's ModelStatistics of one router, from its chain's figures.

    ``inference_count`` counts tokens answered (Triton counts batch items) and
    ``execution_count`` device passes; ``success`` sums every answered call's time in
    the chain, ``queue``/``compute_infer`` those of computed answers (cache hits have
    neither); ``fail`` counts errors (their time is not kept).
    """
    figures = chain.figures()
    requests = figures.requests
    d = requests.durations
    duration = oip.StatisticDuration
    cache = figures.cache
    return oip.ModelStatistics(
        name=name,
        version=chain.hosted.versions[0],
        last_inference=int(d.last_answer_unix_s * 1e3),
        inference_count=requests.tokens,
        execution_count=0 if figures.device is None else figures.device.passes,
        inference_stats=oip.InferStatistics(
            success=duration(count=d.answered, ns=int(d.latency_total_s * 1e9)),
            fail=duration(count=requests.errors),
            queue=duration(count=d.computed, ns=d.queue_total_us * 1000),
            compute_infer=duration(count=d.computed, ns=d.compute_total_us * 1000),
            cache_hit=duration(count=0 if cache is None else cache.hit_count),
            cache_miss=duration(count=0 if cache is None else cache.miss_count),
        ),
    )
