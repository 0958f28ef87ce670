"""The ways into a router's chain. Each door decodes its protocol, calls the chain, encodes.

- ``v1_service`` + ``v1_convert`` + ``request_wire``: the ``moe_router.v1`` gRPC service.
- ``inprocess``: the seed's in-process wrappers (``create_cached_router`` and friends).
- ``server``: the process around the gRPC doors (ports, health, security, start, drain).
Status codes come from one table (``moe_router.status_mapping``) for every gRPC door.
"""
