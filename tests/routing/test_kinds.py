"""The kind table: one row per kind, and config, registry and profilers all read it."""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
from pathlib import Path

import pytest
import torch

import moe_router.config as config_package
import moe_router.routing as routing_package
from moe_router.analysis.profilers import build_router_from_dict
from moe_router.config import RouterSpec, load_config
from moe_router.errors import RouterConfigurationError
from moe_router.loading.registry import construct_router
from moe_router.routing.base import RouterBase
from moe_router.routing.kinds import (
    ROUTER_KINDS,
    Construction,
    RouterKindEntry,
    RoutingMethod,
    kind_entry,
    kinds_using,
)
from moe_router.routing.router_config import RouterConfig

SPEC_FIELDS = {f.name: f for f in dataclasses.fields(RouterSpec)}
ROWS = list(ROUTER_KINDS.values())


def _ids(row: RouterKindEntry) -> str:
    return row.kind.value


def test_the_kind_enum_exists_once() -> None:
    assert config_package.RouterKind is routing_package.RoutingMethod is RoutingMethod
    assert list(ROUTER_KINDS) == list(RoutingMethod)  # one row per kind, in enum order
    assert all(ROUTER_KINDS[k].kind is k for k in RoutingMethod)


@pytest.mark.parametrize("row", ROWS, ids=_ids)
def test_each_row_names_a_router_class_that_takes_its_arguments(row: RouterKindEntry) -> None:
    cls = row.router_class()
    assert issubclass(cls, RouterBase)
    accepted = set()
    for klass in cls.__mro__:  # **kwargs hands the rest on to the base's __init__
        params = inspect.signature(klass.__init__).parameters
        accepted |= {p for p, v in params.items() if v.kind is not v.VAR_KEYWORD}
        if not any(v.kind is v.VAR_KEYWORD for v in params.values()):
            break
    assert set(row.arguments) <= accepted
    if row.construction is Construction.DIMENSIONS:
        assert {"input_dim", "num_experts"} <= accepted
    else:
        assert "config" in accepted


@pytest.mark.parametrize("row", ROWS, ids=_ids)
def test_each_row_reads_real_spec_and_config_fields(row: RouterKindEntry) -> None:
    assert row.spec_fields <= set(SPEC_FIELDS)
    assert row.config_fields <= {f.name for f in dataclasses.fields(RouterConfig)}
    assert row.description.strip() and "\n" not in row.description
    assert len(row.description) <= 100


def test_the_schema_takes_each_keys_kinds_from_the_table() -> None:
    for name, field in SPEC_FIELDS.items():
        declared = field.metadata["kinds"]
        if kinds_using(name):
            assert declared == kinds_using(name), name
        else:  # a key every kind shares
            assert declared is None, name


def test_the_registry_builds_the_row_class_with_the_row_arguments(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""\
        testing: {enable_fault_injection: true}
        routers:
          - {name: flaky, kind: fault_injection, input_dim: 8, num_experts: 4, top_k: 2,
             fault: {slow_while_file_exists: slow.flag, slow_ms: 5}}
          - {name: grouped, kind: grouped_top_k, input_dim: 8, num_experts: 4, top_k: 2,
             n_group: 2, topk_group: 1, use_correction_bias: true}
    """))
    flaky, grouped = load_config(path, env={}).routers
    router = construct_router(flaky)
    assert type(router) is kind_entry("fault_injection").router_class()
    assert router.slow_while_file_exists == tmp_path / "slow.flag"
    assert router.slow_ms == 5.0 and router.fail_while_file_exists is None
    assert router.config.routing_method is RoutingMethod.FAULT_INJECTION
    assert construct_router(grouped).use_correction_bias is True


def test_an_unknown_kind_names_every_kind() -> None:
    with pytest.raises(RouterConfigurationError, match="kind: must be one of 'top_k', "
                       "'grouped_top_k', .*'fault_injection', 'hash', 'sparsemixer', "
                       "got 'hashing'"):
        kind_entry("hashing")


def test_estimator_options_cannot_shadow_a_routers_own_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("routers:\n  - {name: d, kind: dynamic, input_dim: 8, num_experts: 4,\n"
                    "     estimator_options: {max_experts: 3}}\n")
    with pytest.raises(RouterConfigurationError,
                       match=r"routers\[0\]\.estimator_options: max_experts are keys of the "
                             "router itself; set them there"):
        load_config(path, env={})


def test_the_profilers_build_every_kind_from_the_table() -> None:
    required = {RoutingMethod.HASH: {"vocab_size": 16}}  # keys with no default
    for row in ROWS:
        params: dict[str, object] = {"kind": row.kind.value, "num_experts": 4,
                                     **required.get(row.kind, {})}
        router = build_router_from_dict(params, hidden_dim=8)
        assert type(router) is row.router_class()
        inputs = {"input_ids": torch.arange(3)} if router.takes_input_ids else {}
        out = router(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), **inputs)
        assert out.expert_indices.shape[0] == 3
