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

from moe_router.doors.health import HealthState
from moe_router.doors.oip_convert import parse_infer_request, request_to_call
from moe_router.doors.oip_service import OipService
from moe_router.doors.shm_regions import SharedMemoryRegistry
from moe_router.errors import DrainingError, ValidationError
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


def test_infer_is_unavailable_while_loading_and_while_draining():
    async def scenario() -> None:
        health = HealthState(["mixtral"])
        service = OipService({}, health, SharedMemoryRegistry(), version="test")
        wire = oip.ModelInferRequest(model_name="mixtral").SerializeToString()
        request = parse_infer_request(wire)
        with pytest.raises(DrainingError, match="loading its routers") as loading:
            await service._infer(request, None)  # type: ignore[arg-type]
        assert status_code_for(loading.value).name == "UNAVAILABLE"
        no_context: Any = None  # these handlers never read it
        ready = await service.ServerReady(oip.ServerReadyRequest(), no_context)
        model = await service.ModelReady(oip.ModelReadyRequest(name="mixtral"), no_context)
        assert not ready.ready and not model.ready
        assert (await service.ServerLive(oip.ServerLiveRequest(), no_context)).live
        await health.mark_ready()
        await health.mark_draining()
        with pytest.raises(DrainingError, match="draining for shutdown"):
            await service._infer(request, None)  # type: ignore[arg-type]

    asyncio.run(scenario())
