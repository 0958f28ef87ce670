"""Raw config values -> typed values: one value against its field type and bounds, one
mapping against a config dataclass. Errors go through the :class:`Context`, which names
the source and the key path. The loader and the router entries both build with these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import is_dataclass
from enum import Enum
from pathlib import Path
from types import MappingProxyType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

from moe_router.config.sources import Context, describe, schema, settable, unwrap

__all__ = ["convert", "check_bounds", "build_partial", "build"]


def convert(value: Any, hint: Any, path: str, ctx: Context, meta: Mapping[str, Any]) -> Any:
    """Check one value against its field type and bounds; return it typed."""
    origin = get_origin(hint)
    if origin in (Union, UnionType):
        return None if value is None else convert(value, unwrap(hint), path, ctx, meta)
    if is_dataclass(hint):
        return build(hint, value, path, ctx)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            ctx.fail(path, f"must be a list, got {describe(value)}")
        return tuple(
            convert(item, get_args(hint)[0], f"{path}[{i}]", ctx, meta)
            for i, item in enumerate(value)
        )
    if origin is Mapping or hint is Mapping:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            ctx.fail(path, f"must be a mapping with string keys, got {describe(value)}")
        return MappingProxyType(dict(value))
    if origin is Literal:
        allowed = get_args(hint)
        match = [a for a in allowed if isinstance(value, str) and a.lower() == value.lower()]
        if not match:
            ctx.fail(path, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return match[0]
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in hint)
            ctx.fail(path, f"must be one of {choices}, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        ctx.fail(path, f"must be true or false, got {describe(value)}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        ctx.fail(path, f"must be an integer, got {describe(value)}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            ctx.fail(path, f"must be a number, got {describe(value)}")
        value = float(value)
        if not math.isfinite(value):
            ctx.fail(path, f"must be finite, got {value}")
    if hint is str and not isinstance(value, str):
        ctx.fail(path, f"must be a string, got {describe(value)}")
    if hint is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            ctx.fail(path, f"must be a file path, got {describe(value)}")
        return ctx.resolve(path, str(value))
    check_bounds(value, path, ctx, meta)
    return value


def check_bounds(value: Any, path: str, ctx: Context, meta: Mapping[str, Any]) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        gt, lo, hi = meta.get("gt"), meta.get("lo"), meta.get("hi")
        if gt is not None and not value > gt:
            ctx.fail(path, f"must be > {gt}, got {value}")
        if lo is not None and value < lo:
            ctx.fail(path, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            ctx.fail(path, f"must be <= {hi}, got {value}")
    pattern = meta.get("pattern")
    if pattern and isinstance(value, str) and not re.fullmatch(pattern, value):
        ctx.fail(path, f"must be {meta['pattern_help']}, got {value!r}")


def build_partial(cls: type, raw: Any, path: str, ctx: Context) -> dict[str, Any]:
    """The typed values of the keys ``raw`` sets (unknown keys are errors)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        ctx.fail(path, f"must be a mapping, got {describe(raw)}")
    fields_, allowed = schema(cls), settable(cls)
    values = {}
    for key, value in raw.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in allowed:
            if key in fields_:
                ctx.fail(sub, f"cannot be set: {fields_[key][0].metadata['doc']}")
            ctx.unknown(sub, key, allowed)
        f, hint = fields_[key]
        values[key] = convert(value, hint, sub, ctx, f.metadata)
    return values


def build(cls: type, raw: Any, path: str, ctx: Context) -> Any:
    return cls(**build_partial(cls, raw, path, ctx))
