"""The Open Inference Protocol door through unmodified `tritonclient.grpc` (sync) against
a real `moe-router serve`: health, metadata, inference in every dtype equal to Route's
bit for bit, errors with KServe's status codes, streaming and statistics."""

from __future__ import annotations

import inspect
import queue

import grpc
import numpy as np
import pytest
from oip_calls import CORE, assert_same_bits, hidden, infer_input, route_outputs

from moe_router_client import RouterClient

triton = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def client(oip_server):
    with triton.InferenceServerClient(oip_server.target) as c:
        yield c


@pytest.fixture(scope="module")
def router_client(oip_server):
    with RouterClient(oip_server.target, timeout=30) as c:
        yield c


def status_of(raised: pytest.ExceptionInfo) -> str:
    return raised.value.status()


# ---------------------------------------------------------------- health and metadata
def test_server_is_live_and_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()


def test_model_readiness_of_routers_layers_and_versions(client):
    assert client.is_model_ready("mixtral")
    assert client.is_model_ready("mixtral/1")
    assert not client.is_model_ready("mixtral/2")  # it has 2 layers
    assert not client.is_model_ready("no-such-router")
    version = client.get_model_metadata("mixtral/1").versions[0]
    assert client.is_model_ready("mixtral", model_version=version)
    assert not client.is_model_ready("mixtral", model_version="not-a-version")


def test_server_metadata_names_the_extensions(client):
    metadata = client.get_server_metadata()
    assert metadata.name == "moe-router"
    assert {"statistics", "system_shared_memory"} <= set(metadata.extensions)


def test_model_metadata_gives_inputs_and_outputs_with_shapes(client):
    metadata = client.get_model_metadata("mixtral")  # 64-dim, 8 experts, top-2, 2 layers
    assert metadata.platform == "moe-router/top_k"
    assert len(metadata.versions) == 2
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("hidden_states", "FP32", [-1, 64])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("expert_indices", "INT32", [-1, 2]),
        ("expert_weights", "FP32", [-1, 2]),
        ("num_experts_per_token", "INT32", [-1]),
        ("router_logits", "FP32", [-1, 8]),
        ("tokens_per_expert", "INT64", [8]),
    ]


def test_metadata_of_dynamic_soft_and_expert_choice_routers(client):
    dynamic = client.get_model_metadata("dynamic")  # 32-dim, 1..4 of 8 experts
    assert [t.name for t in dynamic.inputs] == [
        "hidden_states", "attention_weights", "logits", "gradients"
    ]
    outputs = {t.name: list(t.shape) for t in dynamic.outputs}
    assert outputs["expert_indices"] == [-1, -1] and outputs["complexity_scores"] == [-1]
    soft = {t.name: list(t.shape) for t in client.get_model_metadata("soft").outputs}
    assert soft["dispatch_weights"] == soft["combine_weights"] == [-1, 8]  # 4 experts x 2
    choice = {t.name: list(t.shape) for t in client.get_model_metadata("expert-choice").outputs}
    assert choice["expert_indices"] == [-1, -1]  # the call decides how many experts a token gets


def test_metadata_of_an_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("no-such-router")
    assert status_of(raised) == "StatusCode.NOT_FOUND"
    assert "this server hosts" in raised.value.message()


# ---------------------------------------------------------------- inference
@pytest.mark.parametrize("datatype", ["FP32", "FP16", "BF16"])
def test_infer_in_each_dtype_equals_route_bit_for_bit(client, router_client, datatype):
    x = hidden((6, 64), datatype, seed=3)
    result = client.infer(
        "mixtral", [infer_input(triton, "hidden_states", x, datatype)],
        parameters={"layer": 1, "skip_cache": True},
    )
    expected = route_outputs(
        router_client.route("mixtral", x, layer=1, return_router_logits=True, skip_cache=True)
    )
    assert [o.name for o in result.get_response().outputs] == [
        *CORE, "router_logits", "tokens_per_expert"
    ]  # none named: every output, in metadata order
    for name, value in expected.items():
        assert_same_bits(result.as_numpy(name), value, name)
    parameters = result.get_response().parameters
    assert parameters["layer"].int64_param == 1
    assert parameters["router_version"].string_param == result.get_response().model_version


@pytest.mark.parametrize("router", ["deepseek", "expert-choice", "soft", "dynamic-logits"])
def test_every_router_kind_equals_route(client, router_client, router):
    x = hidden((2, 3, 32), seed=5)  # [batch, seq, dim] answers [batch, seq, ...]
    result = client.infer(router, [infer_input(triton, "hidden_states", x, "FP32")],
                          parameters={"skip_cache": True})
    expected = route_outputs(
        router_client.route(router, x, return_router_logits=True, skip_cache=True)
    )
    assert result.as_numpy("expert_indices").shape[:2] == (2, 3)
    for name, value in expected.items():
        assert_same_bits(result.as_numpy(name), value, name)


def test_outputs_come_in_the_order_asked(client, router_client):
    x = hidden((4, 64), seed=8)
    names = ["num_experts_per_token", "expert_weights", "expert_indices"]
    result = client.infer(
        "mixtral", [infer_input(triton, "hidden_states", x, "FP32")],
        outputs=[triton.InferRequestedOutput(n) for n in names],
    )
    response = result.get_response()
    assert [o.name for o in response.outputs] == names
    assert len(response.raw_output_contents) == 3
    expected = route_outputs(router_client.route("mixtral", x))
    for index, name in enumerate(names):
        assert response.raw_output_contents[index] == expected[name].tobytes()


def test_the_layer_as_a_model_name_answers_like_the_parameter(client):
    x = hidden((3, 64), seed=9)
    by_name = client.infer("mixtral/1", [infer_input(triton, "hidden_states", x, "FP32")])
    by_parameter = client.infer("mixtral", [infer_input(triton, "hidden_states", x, "FP32")],
                                parameters={"layer": 1})
    layer0 = client.infer("mixtral", [infer_input(triton, "hidden_states", x, "FP32")])
    assert_same_bits(by_name.as_numpy("expert_weights"), by_parameter.as_numpy("expert_weights"))
    assert by_name.as_numpy("router_logits").tobytes() != layer0.as_numpy("router_logits").tobytes()


def test_estimator_inputs_reach_the_dynamic_router(client, router_client):
    x = hidden((1, 4, 32), seed=10)
    logits = hidden((1, 4, 50), seed=11) * 4  # the language model's next-token logits

    def infer(*extra):
        return client.infer("dynamic-logits", [
            infer_input(triton, "hidden_states", x, "FP32"), *extra
        ], parameters={"skip_cache": True})

    with_logits = infer(infer_input(triton, "logits", logits, "FP32"))
    expected = router_client.route("dynamic-logits", x, logits=logits, skip_cache=True)
    for name in ("expert_indices", "complexity_scores"):
        assert_same_bits(with_logits.as_numpy(name), getattr(expected, name), name)
    without = infer()  # the router's own uncertainty instead: another score
    assert (without.as_numpy("complexity_scores").tobytes()
            != with_logits.as_numpy("complexity_scores").tobytes())


def test_a_repeated_call_is_a_cache_hit_and_route_shares_the_cache(client, router_client):
    x = hidden((2, 64), seed=12)
    outputs = [triton.InferRequestedOutput(n) for n in CORE]

    def call():
        return client.infer("mixtral", [infer_input(triton, "hidden_states", x, "FP32")],
                            outputs=outputs)

    first, second = call(), call()
    assert not first.get_response().parameters["cache_hit"].bool_param
    assert second.get_response().parameters["cache_hit"].bool_param
    assert router_client.route("mixtral", x).info.cache_hit  # one chain, one cache


def test_return_losses_answers_routes_aux_and_z_losses(client, router_client):
    """Parameter return_losses=True: the response parameters carry the losses Route
    answers with return_losses (RouteRequest field 12, where the client has it)."""
    x = hidden((2, 3, 64), seed=13)
    result = client.infer("mixtral", [infer_input(triton, "hidden_states", x, "FP32")],
                          parameters={"layer": 1, "return_losses": True, "skip_cache": True})
    losses = {} if "return_losses" not in inspect.signature(router_client.route).parameters \
        else {"return_losses": True}
    expected = router_client.route("mixtral", x, layer=1, skip_cache=True, **losses)
    parameters = result.get_response().parameters
    assert expected.info.aux_loss is not None and expected.info.z_loss is not None
    # double_param holds the float32 the router computed: the same number, exactly
    assert parameters["aux_loss"].double_param == expected.info.aux_loss
    assert parameters["z_loss"].double_param == expected.info.z_loss
    assert_same_bits(result.as_numpy("expert_weights"), expected.expert_weights)
    error = _bad_call(client, parameters={"return_losses": 1})
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "parameter return_losses: expected a bool" in error.message()


# ---------------------------------------------------------------- errors
def _bad_call(client, model="mixtral", inputs=None, **kwargs) -> InferenceServerException:
    inputs = inputs or [infer_input(triton, "hidden_states", hidden((2, 64)), "FP32")]
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, inputs, **kwargs)
    return raised.value


def test_unknown_model_is_not_found(client):
    error = _bad_call(client, model="no-such-router")
    assert error.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: [infer_input(triton, "hidden_states", hidden((2, 64)).astype(np.float64),
                              "FP64")], "datatype 'FP64' is not accepted"),
        (lambda: [infer_input(triton, "hidden_states", np.ones((2, 64), np.int32), "INT32")],
         "datatype 'INT32' is not accepted"),
        (lambda: [infer_input(triton, "hidden_states", hidden((2, 63)), "FP32")], "63"),
        (lambda: [infer_input(triton, "hidden_state", hidden((2, 64)), "FP32")],
         "unexpected input 'hidden_state'"),
        (lambda: [infer_input(triton, "hidden_states", hidden((2, 64)), "FP32").set_shape([3, 64])],
         "expected 768"),
        (lambda: [infer_input(triton, "hidden_states", np.full((2, 64), np.nan, np.float32),
                              "FP32")], "non-finite"),
    ],
    ids=["fp64", "int32", "wrong-dim", "misspelt-input", "byte-count", "nan"],
)
def test_bad_inputs_are_invalid_argument_and_say_what_was_expected(client, make, says):
    error = _bad_call(client, inputs=make())
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert says in error.message()


def test_bad_outputs_parameters_and_layers(client):
    error = _bad_call(client, outputs=[triton.InferRequestedOutput("complexity_scores")])
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "outputs [" in error.message()
    error = _bad_call(client, parameters={"layr": 1})
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "'layr'" in error.message()
    error = _bad_call(client, model="mixtral/1", parameters={"layer": 0})
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "contradicts" in error.message()
    error = _bad_call(client, parameters={"layer": 7})
    assert error.status() == "StatusCode.NOT_FOUND" and "expected 0..1" in error.message()
    error = _bad_call(client, model_version="not-a-version")
    assert error.status() == "StatusCode.NOT_FOUND"


def test_a_method_we_do_not_serve_is_unimplemented(client):
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_config("mixtral")
    assert status_of(raised) == "StatusCode.UNIMPLEMENTED"


# ---------------------------------------------------------------- streaming, statistics
def test_stream_infer_answers_in_order_and_reports_a_bad_request_in_band(
    client, router_client
):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    inputs = [hidden((1 + i, 64), seed=20 + i) for i in range(5)]
    try:
        for i, x in enumerate(inputs):
            model = "no-such-router" if i == 2 else "mixtral"
            client.async_stream_infer(model, [infer_input(triton, "hidden_states", x, "FP32")],
                                      request_id=f"s{i}", parameters={"layer": i % 2})
        received = [answers.get(timeout=30) for _ in inputs]
    finally:
        client.stop_stream()
    for i, (result, error) in enumerate(received):
        if i == 2:
            assert result is None and "unknown model 'no-such-router'" in error.message()
            continue
        assert error is None and result.get_response().id == f"s{i}"
        expected = router_client.route("mixtral", inputs[i], layer=i % 2)
        assert_same_bits(result.as_numpy("expert_indices"), expected.expert_indices)


def test_statistics_count_calls_tokens_and_cache_hits(client):
    def stats():
        (entry,) = client.get_inference_statistics("mixtral").model_stats
        return entry

    before = stats()
    x = hidden((7, 64), seed=30)
    for _ in range(3):  # one computed, two cache hits
        client.infer("mixtral", [infer_input(triton, "hidden_states", x, "FP32")],
                     outputs=[triton.InferRequestedOutput("expert_indices")])
    _bad_call(client, inputs=[infer_input(triton, "hidden_states", hidden((2, 63)), "FP32")])
    after = stats()
    assert after.name == "mixtral"
    s0, s1 = before.inference_stats, after.inference_stats
    assert s1.success.count - s0.success.count == 3
    assert s1.fail.count - s0.fail.count == 1
    assert s1.cache_hit.count - s0.cache_hit.count == 2
    assert s1.cache_miss.count - s0.cache_miss.count == 2  # the computed call and the bad one
    assert after.inference_count - before.inference_count == 3 * 7
    assert s1.success.ns > 0
    everything = client.get_inference_statistics().model_stats
    assert sorted(e.name for e in everything) == sorted(
        ["mixtral", "mixtral-wait", "deepseek", "expert-choice", "soft", "dynamic",
         "dynamic-logits"]
    )


def test_reflection_serves_the_inference_service(oip_server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(oip_server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in set(database.get_services())
        found = database.FindFileContainingSymbol("inference.GRPCInferenceService")
        assert found.package == "inference"
        assert "ModelInfer" in [m.name for m in found.service[0].method]
