"""moe-router: a gRPC service hosting Mixture-of-Experts token routers."""
