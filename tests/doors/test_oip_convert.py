"""The Open Inference Protocol conversions on their own: the zero-copy ModelInferRequest
decoder agrees with protobuf's parser, input tensors stay views of the received bytes,
and the door refuses with UNAVAILABLE until the routers are loaded."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_router.doors.admission import Admission
from moe_router.doors.health import HealthState
from moe_router.doors.oip_convert import parse_infer_request, request_to_call
from moe_router.doors.oip_service import OipService
from moe_router.doors.shm_regions import SharedMemoryRegistry
from moe_router.errors import DrainingError, NotFoundError, ValidationError
from moe_router.status_mapping import status_code_for
from moe_router_client.inference import grpc_service_pb2 as oip

parameters = st.dictionaries(
    st.text(max_size=8),
    st.one_of(
        st.builds(oip.InferParameter, bool_param=st.booleans()),
        st.builds(oip.InferParameter, int64_param=st.integers(-(2**63), 2**63 - 1)),
        st.builds(oip.InferParameter, string_param=st.text(max_size=8)),
    ),
    max_size=3,
)


@settings(max_examples=200, deadline=None)
@given(
    model=st.text(max_size=12),
    request_id=st.text(max_size=8),
    params=parameters,
    shapes=st.lists(st.lists(st.integers(-(2**40), 2**40), max_size=3), max_size=3),
    raw=st.lists(st.binary(max_size=64), max_size=4),
)
def test_decoder_agrees_with_protobuf(model, request_id, params, shapes, raw):
    request = oip.ModelInferRequest(model_name=model, id=request_id)
    for key, value in params.items():
        request.parameters[key].CopyFrom(value)
    for i, shape in enumerate(shapes):
        request.inputs.add(name=f"in{i}", datatype="FP32", shape=shape)
    request.outputs.add(name="expert_indices")
    request.raw_input_contents.extend(raw)
    wire = request.SerializeToString()
    view = parse_infer_request(wire)
    assert view.error == ""
    assert [bytes(payload) for payload in view.raw_inputs] == raw
    reference = oip.ModelInferRequest.FromString(wire)
    reference.ClearField("raw_input_contents")
    assert view.message == reference


def test_malformed_bytes_are_the_callers_error():
    view = parse_infer_request(b"\x3a\xff\xff")  # field 7, a length past the end
    assert view.error.startswith("malformed ModelInferRequest")
    with pytest.raises(ValidationError, match="malformed ModelInferRequest"):
        request_to_call(view, {}, SharedMemoryRegistry(), owner="", peer="", time_remaining=None)


def test_hidden_states_are_a_view_of_the_received_bytes(tmp_path):
    """No copy between gRPC's buffer and the RouteCall: the tensor points into it."""
    from server_process import small_routers, write_config

    from moe_router.chain.hosted import build_chain
    from moe_router.chain.pool import DevicePool
    from moe_router.config import load_config
    from moe_router.loading.registry import load_routers

    config = load_config(write_config(tmp_path / "c.yaml", small_routers()[:1]), env={})
    pool = DevicePool(max_workers=1, autoscale=False, name="test")
    try:
        chains = {n: build_chain(r, config, pool, None) for n, r in load_routers(config).items()}
        hidden = np.arange(3 * 64, dtype=np.float32).reshape(3, 64)
        request = oip.ModelInferRequest(model_name="mixtral", id="r")
        request.inputs.add(name="hidden_states", datatype="FP32", shape=[3, 64])
        request.raw_input_contents.append(hidden.tobytes())
        wire = request.SerializeToString()
        call, outputs = request_to_call(parse_infer_request(wire), chains, SharedMemoryRegistry(),
                                        owner="", peer="p", time_remaining=None)
        start = np.frombuffer(wire, dtype=np.uint8).ctypes.data
        assert start <= call.hidden_states.data_ptr() < start + len(wire)
        np.testing.assert_array_equal(call.hidden_states.numpy(), hidden)
        assert (call.router, call.layer, call.request_id, call.peer) == ("mixtral", 0, "r", "p")
        assert [o.name for o in outputs][:3] == [
            "expert_indices", "expert_weights", "num_experts_per_token"
        ]
        assert call.options.return_router_logits  # every output, router_logits included
    finally:
        pool.shutdown(wait=False)


def test_the_return_losses_parameter_sets_the_calls_option(tmp_path):
    """A bool request parameter, False when absent; any other kind is refused."""
    from server_process import small_routers, write_config

    from moe_router.chain.hosted import build_chain
    from moe_router.chain.pool import DevicePool
    from moe_router.config import load_config
    from moe_router.loading.registry import load_routers

    config = load_config(write_config(tmp_path / "c.yaml", small_routers()[:1]), env={})
    pool = DevicePool(max_workers=1, autoscale=False, name="test")
    try:
        chains = {n: build_chain(r, config, pool, None) for n, r in load_routers(config).items()}
        request = oip.ModelInferRequest(model_name="mixtral")
        request.inputs.add(name="hidden_states", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(np.zeros(64, np.float32).tobytes())

        def call_of(message: oip.ModelInferRequest) -> Any:
            view = parse_infer_request(message.SerializeToString())
            return request_to_call(view, chains, SharedMemoryRegistry(), owner="", peer="p",
                                   time_remaining=None)[0]

        assert call_of(request).options.return_losses is False
        for asked in (True, False):
            request.parameters["return_losses"].bool_param = asked
            assert call_of(request).options.return_losses is asked
        request.parameters["return_losses"].int64_param = 1
        with pytest.raises(ValidationError, match="parameter return_losses: expected a bool"):
            call_of(request)
    finally:
        pool.shutdown(wait=False)


def test_input_ids_in_shared_memory_are_copied_not_viewed(tmp_path):
    """Ids index the hash table: rewriting the region after the call was decoded (where
    the device stage would check their range) must not reach the call."""
    import torch
    from safetensors.torch import save_file
    from server_process import write_config

    from moe_router.chain.hosted import build_chain
    from moe_router.chain.pool import DevicePool
    from moe_router.config import load_config
    from moe_router.loading.registry import load_routers
    from moe_router_client.colocated_session import MemfdRegion

    gen = torch.Generator().manual_seed(0)
    save_file({"g": torch.randn(4, 8, generator=gen), "t": torch.randint(0, 4, (16, 2))},
              str(tmp_path / "hash.safetensors"))
    hashed = {"name": "hashed", "kind": "hash", "input_dim": 8, "num_experts": 4, "top_k": 2,
              "vocab_size": 16, "weights": {"path": str(tmp_path / "hash.safetensors"),
                                             "gate": "g", "tensors": {"token_experts": "t"}}}
    config = load_config(write_config(tmp_path / "c.yaml", [hashed]), env={})
    pool = DevicePool(max_workers=1, autoscale=False, name="test")
    regions, region = SharedMemoryRegistry(), MemfdRegion("ids", 4096)
    try:
        chains = {n: build_chain(r, config, pool, None) for n, r in load_routers(config).items()}
        assert region.fd is not None
        regions.register_descriptor("ids", region.fd, region.size)
        region.fd = None  # the registry owns it now
        region.bytes[:24] = np.array([1, 2, 3], dtype="<i8").view(np.uint8)
        request = oip.ModelInferRequest(model_name="hashed")
        request.inputs.add(name="hidden_states", datatype="FP32", shape=[3, 8])
        ids = request.inputs.add(name="input_ids", datatype="INT64", shape=[3])
        ids.parameters["shared_memory_region"].string_param = "ids"
        ids.parameters["shared_memory_byte_size"].int64_param = 24
        request.raw_input_contents.append(np.zeros((3, 8), np.float32).tobytes())
        call, _ = request_to_call(parse_infer_request(request.SerializeToString()), chains,
                                  regions, owner="", peer="p", time_remaining=None)
        region.bytes[:24] = np.array([99, 99, 99], dtype="<i8").view(np.uint8)
        assert call.options.input_ids is not None
        assert call.options.input_ids.tolist() == [1, 2, 3]
    finally:
        regions.unregister("ids")
        region.close()
        pool.shutdown(wait=False)


class _Context:
    """What ModelInfer reads of its gRPC context: the peer and the deadline."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def time_remaining(self) -> None:
        return None


def test_infer_is_unavailable_while_loading_served_while_not_serving_refused_once_closed():
    """As Route (test_service_readiness): NOT_SERVING during the drain delay still routes;
    the drain's refusal comes from the admission the doors share."""
    async def scenario() -> None:
        health = HealthState(["mixtral"])
        admission = Admission(4, 1 << 20)
        service = OipService({}, health, SharedMemoryRegistry(), version="test",
                             admission=admission)
        wire = oip.ModelInferRequest(model_name="mixtral").SerializeToString()
        request = parse_infer_request(wire)
        assert request.nbytes == len(wire)
        with pytest.raises(DrainingError, match="loading its routers") as loading:
            await service._admitted_infer(request, None)  # type: ignore[arg-type]
        assert status_code_for(loading.value).name == "UNAVAILABLE"
        no_context: Any = None  # these handlers never read it
        ready = await service.ServerReady(oip.ServerReadyRequest(), no_context)
        model = await service.ModelReady(oip.ModelReadyRequest(name="mixtral"), no_context)
        assert not ready.ready and not model.ready
        assert (await service.ServerLive(oip.ServerLiveRequest(), no_context)).live
        await health.mark_ready()
        await health.mark_draining()
        assert not (await service.ServerReady(oip.ServerReadyRequest(), no_context)).ready
        with pytest.raises(NotFoundError):  # NOT_SERVING published, but the call is routed
            await service._admitted_infer(request, _Context())  # type: ignore[arg-type]
        admission.close()
        with pytest.raises(DrainingError, match="draining for shutdown") as draining:
            await service._admitted_infer(request, None)  # type: ignore[arg-type]
        assert status_code_for(draining.value).name == "UNAVAILABLE"
        assert admission.stats().calls == 0

    asyncio.run(scenario())


class _ReadingContext(_Context):
    """A ModelInfer context whose one message arrives when the test says."""

    def __init__(self, message: bytes) -> None:
        self.arrived = asyncio.Event()
        self.message = message
        self.callbacks: list[Any] = []

    def add_done_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)

    async def read(self) -> Any:
        await self.arrived.wait()
        return parse_infer_request(self.message)


def test_a_modelinfer_call_is_admitted_before_its_message_is_read_and_counted_reading():
    """What the batcher waits for (``Admission.reading``) and what the drain holds: the
    call from its start, before its message has arrived, until gRPC has its answer."""
    async def scenario() -> None:
        health = HealthState(["mixtral"])
        await health.mark_ready()
        admission = Admission(4, 1 << 20)
        service = OipService({}, health, SharedMemoryRegistry(), version="test",
                             admission=admission)
        wire = oip.ModelInferRequest(model_name="mixtral").SerializeToString()
        context = _ReadingContext(wire)
        call = asyncio.ensure_future(service._infer_call(context))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert admission.reading() == 1 and admission.stats().calls == 1
        context.arrived.set()
        outcome = await call
        assert isinstance(outcome.error, NotFoundError)  # type: ignore[union-attr]
        assert admission.reading() == 0 and admission.stats().calls == 1  # until sent
        for callback in context.callbacks:
            callback(context)
        assert admission.stats().calls == 0

    asyncio.run(scenario())
