"""Frozen dataclasses that cost what a plain one costs to build.

A frozen dataclass's generated ``__init__`` sets each field through
``object.__setattr__``, since its own ``__setattr__`` refuses: about 80 ns a field on
this project's CPUs, 1.3 us for a 14-field co-located answer, and a call builds several
such objects on each side of either door. :func:`fast_init` gives such a class an
``__init__`` with the very signature (defaults, default factories, keyword-only fields,
``__post_init__``) that fills the instance's ``__dict__`` in one go instead. The
instances are the same: as frozen (assigning a field still raises), equal, hashed,
copied by ``dataclasses.replace`` and pickled alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["fast_init"]

T = TypeVar("T")

_FACTORY = object()  # a parameter's default when its field has a default factory


def fast_init(cls: type[T]) -> type[T]:
    """Replace the generated ``__init__`` of frozen dataclass ``cls`` (apply it on top of
    ``@dataclass(frozen=True)``). Refuses classes it cannot serve alike: not a frozen
    dataclass, ``__slots__`` (no instance dict) or ``InitVar`` fields."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"{cls.__name__}: fast_init is for frozen dataclasses")
    if "__slots__" in cls.__dict__:
        raise TypeError(f"{cls.__name__}: fast_init needs an instance __dict__ (no slots)")
    if any(f._field_type is dataclasses._FIELD_INITVAR  # type: ignore[attr-defined]
           for f in cls.__dataclass_fields__.values()):  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__}: fast_init does not take InitVar fields")
    namespace: dict[str, Any] = {"_FACTORY": _FACTORY}
    positional: list[str] = []
    keyword: list[str] = []
    body: list[str] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f.name
        has_factory = f.default_factory is not dataclasses.MISSING
        if has_factory:
            namespace[f"_factory_{name}"] = f.default_factory
        if not f.init:  # as the generated __init__: a factory's value, else the class's
            if has_factory:
                body.append(f"d[{name!r}] = _factory_{name}()")
            continue
        if has_factory:
            parameter = f"{name}=_FACTORY"
            body.append(f"d[{name!r}] = _factory_{name}() if {name} is _FACTORY else {name}")
        else:
            if f.default is not dataclasses.MISSING:
                namespace[f"_default_{name}"] = f.default
                parameter = f"{name}=_default_{name}"
            else:
                parameter = name
            body.append(f"d[{name!r}] = {name}")
        (keyword if f.kw_only else positional).append(parameter)
    signature = ", ".join(["self", *positional, *(["*", *keyword] if keyword else [])])
    if hasattr(cls, "__post_init__"):
        body.append("self.__post_init__()")
    source = (f"def __init__({signature}):\n    d = self.__dict__\n"
              + "".join(f"    {line}\n" for line in body))
    exec(source, namespace)  # noqa: S102 - as dataclasses itself builds __init__
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__doc__ = cls.__init__.__doc__
    init.__annotations__ = dict(cls.__init__.__annotations__)
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
