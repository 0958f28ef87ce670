"""The field helper every config dataclass declares its keys with.

A key's metadata (``doc``, ``env``, bounds, the router kinds that use it) drives the
loader, so a key's type, default, variable and limits are declared once, on the field.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import MISSING, field
from typing import Any

from moe_router.routing.kinds import RoutingMethod

__all__ = ["MiB", "config_field"]

MiB = 1024 * 1024


def config_field(
    default: Any = MISSING,
    doc: str = "",
    *,
    factory: Any = None,
    env: str | None = None,
    lo: float | None = None,
    hi: float | None = None,
    gt: float | None = None,
    pattern: str | None = None,
    pattern_help: str = "",
    kinds: Iterable[RoutingMethod] | None = None,
    alias_of: str | None = None,
    derived: bool = False,
    repr: bool = True,
) -> Any:
    """A dataclass field whose metadata drives the loader (see module docstring)."""
    metadata = {
        "doc": doc,
        "env": env,
        "lo": lo,
        "hi": hi,
        "gt": gt,
        "pattern": pattern,
        "pattern_help": pattern_help,
        "kinds": None if kinds is None else frozenset(kinds),
        "alias_of": alias_of,
        "derived": derived,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=repr)
    return field(default=default, metadata=metadata, repr=repr)
