"""gRPC server reflection under both names: ``grpc.reflection.v1`` and ``v1alpha``.

Current grpcurl (and Postman, k6, grpcui) ask for ``grpc.reflection.v1.ServerReflection``
first; grpcio-reflection serves only ``v1alpha`` (grpc/grpc#38576). The two protocols are
the same messages under another package name (the v1 proto was copied from v1alpha), so
v1 is served by grpcio-reflection's own servicer and message classes, registered under the
v1 method name, and its file descriptor (v1alpha's, renamed) is added to the descriptor
pool so that ``grpcurl describe grpc.reflection.v1.ServerReflection`` works as well.
Undecodable requests answer INVALID_ARGUMENT, as on every method of the server.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

from moe_router.doors.method_registration import add_method_handlers
from moe_router.doors.rpc_errors import lenient_handler

__all__ = ["V1_SERVICE_NAME", "V1ALPHA_SERVICE_NAME", "enable_reflection"]

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"

_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Put the v1 reflection proto into ``pool`` (v1alpha's descriptor, renamed)."""
    try:
        pool.FindFileByName(_V1_FILE)
        return  # already there (a later grpcio-reflection, or a second server)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name = _V1_FILE
    proto.package = "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for message_field in message.field:
            if message_field.type_name.startswith(old):
                message_field.type_name = new + message_field.type_name[len(old) :]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    pool.Add(proto)


def enable_reflection(
    service_names: Iterable[str],
    server: grpc.aio.Server,
    pool: descriptor_pool.DescriptorPool | None = None,
) -> None:
    """Serve reflection of ``service_names`` (plus both reflection services) on
    ``server`` under grpc.reflection.v1 and v1alpha, from ``pool`` (protobuf's default
    pool when None; the OIP door's files live in a pool of their own)."""
    pool = descriptor_pool.Default() if pool is None else pool
    _add_v1_descriptor(pool)
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names, pool=pool)
    handler = lenient_handler(
        grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        ),
        reflection_pb2.ServerReflectionRequest.DESCRIPTOR.name,
    )
    for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        add_method_handlers(server, service, {"ServerReflectionInfo": handler})
