"""Configuration: config.yaml + environment + overrides -> typed, validated, frozen.

``schema`` declares every key once (type, default, variable, bounds; which router kinds
read a key comes from :mod:`moe_router.routing.kinds`); ``sources`` reads the file, the
environment and overrides into layers that remember where each value came from;
``loader`` merges them in ``PRECEDENCE`` order and validates; ``environment`` holds the
few process-environment facts launchers need (malloc tuning, child environments).
Nothing outside this package reads the environment (``tests/test_import_graph.py``).

This package's names are the loader's (``load_config``, ``ServiceConfig``, ...),
imported on first use: the CLI reads :mod:`moe_router.config.environment` before it
re-executes itself, and that must not load torch (through the schema) twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moe_router.config.loader import *  # noqa: F403 - this package's public names


def __getattr__(name: str) -> Any:
    """A public name of :mod:`moe_router.config.loader` (or ``__all__``), loaded on first use."""
    import moe_router.config.loader as loader  # not `from . import`: that would call us again

    if name == "__all__":
        return loader.__all__
    if name not in loader.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(loader, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    import moe_router.config.loader as loader

    return sorted(set(globals()) | set(loader.__all__))
