"""Generated protobuf and gRPC modules of ``moe_router.v1`` (``make proto``; never edit by hand).

``router_pb2`` holds the messages and enums, ``router_pb2_grpc`` the stub and servicer,
``router_pb2.pyi`` their types. ``tests/client/test_generated_fresh.py`` fails when they
drift from ``proto/moe_router/v1/router.proto``.
"""
