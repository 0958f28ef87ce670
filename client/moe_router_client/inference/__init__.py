"""Generated modules of the Open Inference Protocol, package ``inference`` (``make proto``;
never edit by hand).

``grpc_service_pb2`` holds the messages of KServe v2 with Triton's extensions as
``proto/inference/grpc_service.proto`` declares them, ``grpc_service_pb2_grpc`` the
stub and servicer, ``grpc_service_pb2.pyi`` their types. Their descriptors live in a
pool of their own (``grpc_service_pb2.DESCRIPTOR.pool``), not protobuf's default pool,
so tritonclient's module of the same names loads beside them
(``scripts/gen_protos.py`` says more). ``tests/client/test_generated_fresh.py`` fails
when they drift from the proto; ``tests/client/test_oip_descriptors.py`` when the
proto drifts from tritonclient's.
"""
