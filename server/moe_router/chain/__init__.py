"""One backend chain per router: every stage a call goes through, whichever door it came in.

A router's chain, outermost first::

    Metrics -> RequestStats -> RateLimit -> Cache -> CircuitBreaker -> Batcher -> DeviceExecutor

Each stage is a :class:`~moe_router.chain.backend.Backend` wrapping the next (stages
switched off in config.yaml are simply absent); :mod:`moe_router.chain.hosted` builds
it. The batcher drives the device through the narrow :class:`DevicePasses` interface.
"""
