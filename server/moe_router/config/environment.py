"""The process-environment facts launchers need: glibc malloc tuning and child environments.

With :mod:`moe_router.config.loader` (the ``DYNAMIC_MOE_*`` variables), this is the only
module that reads ``os.environ``; a test fails on a read anywhere else. It imports
nothing but the standard library, so the CLI can decide to re-exec before torch loads.

glibc reads its ``MALLOC_*`` tunables only at process start, so ``moe-router serve`` and
``bench`` restart themselves once with :data:`MALLOC_TUNING` set (README "Large
messages": 16 MiB echo calls moved 2.11x the bytes per second with it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "MALLOC_TUNING",
    "REEXEC_MARK",
    "CONFIG_PREFIX",
    "malloc_reexec_environment",
    "malloc_variables",
    "child_environment",
]

MALLOC_TUNING: Mapping[str, str] = MappingProxyType({
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),  # glibc ignores more than 32 MiB
    "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024 * 1024),
    "MALLOC_TOP_PAD_": str(64 * 1024 * 1024),
})
"""glibc malloc tunables for large messages (also written in the Makefile and Dockerfile)."""

REEXEC_MARK = "MOE_ROUTER_MALLOC_TUNED"
"""Set in a re-executed process's environment so that it never re-executes again."""

CONFIG_PREFIX = "DYNAMIC_MOE_"
"""Prefix of the variables the config reads (see :mod:`moe_router.config.loader`)."""


def malloc_reexec_environment() -> dict[str, str] | None:
    """The environment to re-exec this process with so the malloc tuning applies, or None
    when no re-exec is needed: not Linux (glibc), already re-executed, or every tunable
    already set. A variable the caller set wins over :data:`MALLOC_TUNING`."""
    if not sys.platform.startswith("linux") or os.environ.get(REEXEC_MARK):
        return None
    missing = {k: v for k, v in MALLOC_TUNING.items() if k not in os.environ}
    if not missing:
        return None
    return {**os.environ, **missing, REEXEC_MARK: "1"}


def malloc_variables() -> dict[str, str]:
    """The ``MALLOC_*`` variables of this process (for a benchmark report's header)."""
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}


def child_environment(malloc_tuning: bool | None = None) -> dict[str, str]:
    """This process's environment for a child server or client, without ``DYNAMIC_MOE_*``
    (the child's own config rules it).

    malloc_tuning: None keeps the ``MALLOC_*`` variables as they are; True sets them to
    :data:`MALLOC_TUNING`, False removes them. Either way the child is marked as already
    re-executed, so it keeps exactly the variables chosen here.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(CONFIG_PREFIX)}
    if malloc_tuning is not None:
        env = {k: v for k, v in env.items() if k not in MALLOC_TUNING}
        env[REEXEC_MARK] = "1"
        if malloc_tuning:
            env.update(MALLOC_TUNING)
    return env
