"""Client for the moe-router gRPC service (grpcio, protobuf and numpy only)."""
