"""moe-router: a gRPC service hosting Mixture-of-Experts token routers."""

__version__ = "0.1.0"
