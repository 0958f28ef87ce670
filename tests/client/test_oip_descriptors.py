"""Our proto/inference/grpc_service.proto is the published protocol: every message and
method we declare matches tritonclient's own generated module, field by field.

Both modules are read as ``FileDescriptorProto`` (what protoc compiled), so the
comparison sees exactly what goes on the wire: field name, number, type, label,
type_name (the message a field holds), oneof membership and map entries; and for each
method its request and response types and whether each side streams.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf import descriptor_pb2

from moe_router_client.inference import grpc_service_pb2 as ours

triton_service = pytest.importorskip("tritonclient.grpc.service_pb2")

OUR_FILE = descriptor_pb2.FileDescriptorProto.FromString(ours.DESCRIPTOR.serialized_pb)
THEIR_FILE = descriptor_pb2.FileDescriptorProto.FromString(
    triton_service.DESCRIPTOR.serialized_pb
)


def _messages(
    messages: list[descriptor_pb2.DescriptorProto], prefix: str
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    """Every message, nested ones included, by full name."""
    for message in messages:
        name = f"{prefix}.{message.name}"
        yield name, message
        yield from _messages(list(message.nested_type), name)


OUR_MESSAGES = dict(_messages(list(OUR_FILE.message_type), "." + OUR_FILE.package))
THEIR_MESSAGES = dict(_messages(list(THEIR_FILE.message_type), "." + THEIR_FILE.package))


def _field_row(message: descriptor_pb2.DescriptorProto, field: descriptor_pb2.FieldDescriptorProto):
    oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
    return (field.number, field.type, field.label, field.type_name, oneof, field.proto3_optional)


def test_the_package_and_service_are_the_protocols():
    assert OUR_FILE.package == THEIR_FILE.package == "inference"
    assert [s.name for s in OUR_FILE.service] == ["GRPCInferenceService"]
    assert "GRPCInferenceService" in [s.name for s in THEIR_FILE.service]
    assert not OUR_FILE.dependency  # nothing of Triton's model_config.proto is needed


def test_we_declare_every_message_the_implemented_methods_use():
    assert len(OUR_MESSAGES) >= 40  # 29 top-level plus their nested types and map entries
    missing = sorted(set(OUR_MESSAGES) - set(THEIR_MESSAGES))
    assert not missing, f"messages tritonclient does not know: {missing}"


@pytest.mark.parametrize("full_name", sorted(OUR_MESSAGES))
def test_message_matches_tritonclients_field_by_field(full_name: str):
    mine, theirs = OUR_MESSAGES[full_name], THEIR_MESSAGES[full_name]
    my_fields = {f.name: _field_row(mine, f) for f in mine.field}
    their_fields = {f.name: _field_row(theirs, f) for f in theirs.field}
    assert my_fields == their_fields
    assert mine.options.map_entry == theirs.options.map_entry
    assert [o.name for o in mine.oneof_decl] == [o.name for o in theirs.oneof_decl]
    assert sorted(n.name for n in mine.nested_type) == sorted(n.name for n in theirs.nested_type)
    assert sorted(e.name for e in mine.enum_type) == sorted(e.name for e in theirs.enum_type)


def test_every_method_matches_tritonclients():
    (service,) = OUR_FILE.service
    theirs = {m.name: m for s in THEIR_FILE.service if s.name == service.name for m in s.method}
    expected = {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "ModelStreamInfer", "ModelStatistics", "SystemSharedMemoryStatus",
        "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    }
    assert {m.name for m in service.method} == expected
    for method in service.method:
        other = theirs[method.name]
        assert (method.input_type, method.output_type) == (other.input_type, other.output_type)
        assert (method.client_streaming, method.server_streaming) == (
            other.client_streaming, other.server_streaming
        ), method.name


def test_a_request_tritonclient_builds_parses_identically_here():
    """The wire check in one message: tritonclient's bytes decode to the same fields."""
    request = triton_service.ModelInferRequest(model_name="mixtral", id="r1")
    request.parameters["layer"].int64_param = 3
    tensor = request.inputs.add(name="hidden_states", datatype="BF16", shape=[2, 4])
    tensor.parameters["shared_memory_region"].string_param = "in"
    request.outputs.add(name="expert_indices")
    request.raw_input_contents.append(b"\x01\x02")
    parsed = ours.ModelInferRequest.FromString(request.SerializeToString())
    assert parsed.model_name == "mixtral" and parsed.id == "r1"
    assert parsed.parameters["layer"].int64_param == 3
    assert parsed.inputs[0].parameters["shared_memory_region"].string_param == "in"
    assert list(parsed.inputs[0].shape) == [2, 4]
    assert [o.name for o in parsed.outputs] == ["expert_indices"]
    assert list(parsed.raw_input_contents) == [b"\x01\x02"]
    assert parsed.SerializeToString() == request.SerializeToString()
