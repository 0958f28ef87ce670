"""``moe_router.exceptions`` (the seed's path) exports the very classes of moe_router.errors."""

from __future__ import annotations

import builtins

import pytest

import moe_router.errors as errors
import moe_router.exceptions as exceptions
from moe_router.routing import RouterConfig


def test_every_error_class_is_the_same_object_under_both_paths():
    assert sorted(exceptions.__all__) == sorted(errors.__all__)
    for name in errors.__all__:
        assert getattr(exceptions, name) is getattr(errors, name), name


def test_the_seeds_import_line_catches_what_the_router_raises():
    from moe_router.exceptions import (
        ComplexityEstimationError,
        ExpertDispatchError,
        RouterConfigurationError,
    )

    assert issubclass(ComplexityEstimationError, errors.DynamicMoEError)
    assert issubclass(ExpertDispatchError, errors.DynamicMoEError)
    with pytest.raises(RouterConfigurationError, match="top_k"):
        RouterConfig(hidden_size=4, num_experts=2, top_k=3)


def test_the_seeds_memory_error_name_never_shadows_the_builtin():
    from moe_router.exceptions import MemoryError as SeedMemoryError

    assert SeedMemoryError is errors.RouterMemoryError
    assert "MemoryError" not in exceptions.__all__
    namespace: dict = {}
    exec("from moe_router.exceptions import *", namespace)  # noqa: S102
    assert "MemoryError" not in namespace
    assert builtins.MemoryError is not errors.RouterMemoryError
