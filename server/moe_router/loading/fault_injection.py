"""FaultInjectingRouter: a top-k router that fails or stalls on demand, for breaker tests.

A test (or an operator rehearsing an incident) creates a file to make every device call
fail or slow down, and deletes it to heal the router, without restarting the server.
Config allows kind ``fault_injection`` only with ``testing.enable_fault_injection: true``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from moe_router.errors import RouterConfigurationError
from moe_router.routing.router_config import RouterConfig
from moe_router.routing.topk import TopKRouter

__all__ = ["FaultInjectingRouter"]


class FaultInjectingRouter(TopKRouter):
    """TopKRouter whose device step raises while one file exists and sleeps while another does.

    fail_while_file_exists: while this path exists, routing raises
        ``RuntimeError("injected fault ...")`` (an unexpected device failure).
    slow_while_file_exists: while this path exists, routing first sleeps ``slow_ms``.
    The check runs once per device pass (``forward`` and ``route_many``). The answer
    depends on files outside the process, so the router reports itself ``stateful``
    (never cached: a cache hit would hide the fault).
    """

    def __init__(
        self,
        config: RouterConfig,
        fail_while_file_exists: str | Path | None = None,
        slow_while_file_exists: str | Path | None = None,
        slow_ms: float = 0.0,
    ) -> None:
        if isinstance(slow_ms, bool) or not isinstance(slow_ms, (int, float)) or not (
            math.isfinite(slow_ms) and slow_ms >= 0
        ):
            raise RouterConfigurationError(f"slow_ms: must be a number >= 0, got {slow_ms!r}")
        super().__init__(config)
        self.fail_while_file_exists = _path(fail_while_file_exists)
        self.slow_while_file_exists = _path(slow_while_file_exists)
        self.slow_ms = float(slow_ms)

    @property
    def stateful(self) -> bool:
        """Always True: the answer depends on the fault files, so it must not be cached."""
        return True

    def compute_router_logits(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        block_rows: int | None = None,
    ) -> torch.Tensor:
        """Inject the configured fault, then compute the gate logits ``[T, E]`` as usual."""
        if self.fail_while_file_exists is not None and self.fail_while_file_exists.exists():
            raise RuntimeError(
                f"injected fault: {self.fail_while_file_exists} exists (delete it to recover)"
            )
        if self.slow_while_file_exists is not None and self.slow_while_file_exists.exists():
            time.sleep(self.slow_ms / 1000.0)
        return super().compute_router_logits(x, generator, block_rows)


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)
