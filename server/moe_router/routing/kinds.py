"""The router kinds: one enum, and one table row per kind (class, config fields, description).

Every part of the project that needs to know the kinds reads them here: config (which
RouterSpec keys a kind accepts, ``moe_router.config``), the registry (which class to
build and with which arguments, ``moe_router.loading.registry``), the profilers
(``build_router_from_dict``) and the service bench (the enum). Adding a router kind is one module
(the class) plus one row in :data:`ROUTER_KINDS` (and a RouterSpec field only for a
config key no kind had before).

A row names its class by import path (``"package.module:Class"``), loaded on first use,
so importing this table (and validating config) never imports every routing module; the
``fault_injection`` class lives in ``moe_router.loading`` because it reads files.

How a row's class is constructed (``construction``):

- ``ROUTER_CONFIG``: ``Class(router_config, **arguments)``, where the RouterConfig is
  built from the spec's ``config_fields`` (the rest keep RouterConfig's defaults, and
  ``top_k`` is 1 for a kind without a fixed per-token k);
- ``DIMENSIONS``: ``Class(input_dim=D, num_experts=E, **arguments)``, for classes that
  build their own RouterConfig (the seed's dynamic routers).

``arguments`` maps each further constructor keyword to the RouterSpec key it comes from
(dotted for a nested spec, e.g. ``fault.slow_ms``); a value of None is left out so the
class's own default applies. ``extra_arguments`` names a RouterSpec mapping whose items
are passed as more keywords.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from types import MappingProxyType
from typing import Any, Protocol

from moe_router.errors import RouterConfigurationError

__all__ = [
    "RoutingMethod",
    "Construction",
    "RouterKindEntry",
    "RouterDimensions",
    "ROUTER_KINDS",
    "kind_entry",
    "kinds_using",
]


class RoutingMethod(str, Enum):
    """Which routing algorithm a router runs: the config.yaml ``kind`` (also
    ``moe_router.config.RouterKind``); each value has one row in :data:`ROUTER_KINDS`."""

    TOP_K = "top_k"
    GROUPED_TOP_K = "grouped_top_k"
    EXPERT_CHOICE = "expert_choice"
    SOFT_MOE = "soft_moe"
    MOE_ROUTER = "moe_router"
    DYNAMIC = "dynamic"
    ADAPTIVE = "adaptive"
    FAULT_INJECTION = "fault_injection"
    HASH = "hash"
    SPARSEMIXER = "sparsemixer"


class Construction(str, Enum):
    """The constructor convention of a kind's class (see the module docstring)."""

    ROUTER_CONFIG = "router_config"
    DIMENSIONS = "dimensions"


class RouterDimensions(Protocol):
    """What the table reads of a RouterConfig: the gate's input width D and expert count E."""

    @property
    def hidden_size(self) -> int: ...

    @property
    def num_experts(self) -> int: ...


@dataclass(frozen=True)
class RouterKindEntry:
    """One row of the kind table.

    kind: the enum value. class_path: ``"package.module:Class"``, imported on first use.
    description: one line for docs and errors. config_fields: the RouterSpec keys that
    fill this kind's RouterConfig (``top_k``, ``scoring``, ...). arguments: constructor
    keyword -> RouterSpec key path. extra_arguments: a RouterSpec mapping passed as more
    keywords. test_only: allowed only with ``testing.enable_fault_injection: true``.
    """

    kind: RoutingMethod
    class_path: str
    description: str
    construction: Construction = Construction.ROUTER_CONFIG
    config_fields: frozenset[str] = frozenset()
    arguments: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    extra_arguments: str | None = None
    test_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "config_fields", frozenset(self.config_fields))
        object.__setattr__(self, "arguments", MappingProxyType(dict(self.arguments)))

    @property
    def spec_fields(self) -> frozenset[str]:
        """Every RouterSpec key this kind reads beyond the ones all kinds share."""
        from_arguments = {path.split(".", 1)[0] for path in self.arguments.values()}
        extra = {self.extra_arguments} if self.extra_arguments else set()
        return self.config_fields | from_arguments | extra

    def router_class(self) -> type[Any]:
        """The class of this kind (a ``RouterBase`` subclass), imported now (once).

        Typed ``Any`` because this table depends on no router module (they import it);
        a test checks every row names a RouterBase subclass taking the row's arguments.
        """
        return _import_class(self.class_path)

    def arguments_from(self, spec: object) -> dict[str, Any]:
        """The constructor keywords beyond the RouterConfig / dimensions, read off ``spec``
        (a RouterSpec: attribute paths as in :attr:`arguments`); None values left out."""
        kwargs: dict[str, Any] = {}
        for keyword, path in self.arguments.items():
            value: Any = spec
            for part in path.split("."):
                value = None if value is None else getattr(value, part)
            if value is not None:
                kwargs[keyword] = value
        if self.extra_arguments is not None:
            extra = getattr(spec, self.extra_arguments)
            clash = sorted(set(extra) & (set(self.arguments) | {"input_dim", "num_experts"}))
            if clash:
                raise RouterConfigurationError(
                    f"{self.extra_arguments}: {', '.join(clash)} are keys of the router "
                    "itself; set them there"
                )
            kwargs.update(extra)
        return kwargs

    def construct(self, config: RouterDimensions, arguments: Mapping[str, Any]) -> Any:
        """An instance: ``Class(config, **arguments)`` or, for ``DIMENSIONS`` kinds,
        ``Class(input_dim=config.hidden_size, num_experts=config.num_experts, **arguments)``.

        config: the RouterConfig (for ``DIMENSIONS`` kinds only its two sizes are read).
        """
        cls = self.router_class()
        if self.construction is Construction.DIMENSIONS:
            return cls(input_dim=config.hidden_size, num_experts=config.num_experts,
                       **arguments)
        return cls(config, **arguments)


@cache
def _import_class(path: str) -> type[Any]:
    module, _, name = path.partition(":")
    cls: type[Any] = getattr(importlib.import_module(module), name)
    return cls


_K = RoutingMethod
_TOP_K_CONFIG = frozenset({"top_k", "scoring", "renormalize", "routed_scaling_factor",
                           "capacity_factor", "drop_policy"})
# Token dropping beyond the factor: Switch/NLLB-MoE rules and Megatron's padded lists.
_TOP_K_CONFIG |= {"expert_capacity", "capacity_scope", "capacity_priority",
                  "renormalize_after_drop", "pad_to_capacity"}
# The scoring and weighting options of token-choice routers (issue 13).
_SCORE_OPTIONS = frozenset({"gate_bias", "correction_bias_target", "logit_multiplier",
                            "logit_softcap", "renormalize_eps", "input_norm",
                            "input_norm_eps", "per_expert_scale", "learned_weight_scale",
                            "scored_shared_experts"})
_DYNAMIC_ARGUMENTS = {
    name: name
    for name in ("min_experts", "max_experts", "complexity_estimator", "routing_strategy",
                 "load_balancing", "noise_factor", "top_p")
}


_ROWS = (
    RouterKindEntry(
        _K.TOP_K, "moe_router.routing.topk:TopKRouter",
        "Token choice: each token takes its k best experts (Mixtral, Qwen-MoE).",
        config_fields=_TOP_K_CONFIG | _SCORE_OPTIONS | {"aux_loss_assignments"},
        arguments={"use_correction_bias": "use_correction_bias"},
    ),
    RouterKindEntry(
        _K.GROUPED_TOP_K, "moe_router.routing.grouped:GroupedTopKRouter",
        "Group-limited top-k: experts only from the best groups (DeepSeek-V2/V3).",
        config_fields=_TOP_K_CONFIG | _SCORE_OPTIONS
        | {"n_group", "topk_group", "group_score", "group_mask_fill", "aux_loss_assignments"},
        arguments={"use_correction_bias": "use_correction_bias"},
    ),
    RouterKindEntry(
        _K.EXPERT_CHOICE, "moe_router.routing.expert_choice:ExpertChoiceRouter",
        "Expert choice: each expert takes its best tokens up to its capacity (Zhou et al.).",
        config_fields=frozenset({"renormalize", "routed_scaling_factor", "capacity_factor"}),
        arguments={"tokens_per_expert": "tokens_per_expert"},
    ),
    RouterKindEntry(
        _K.SOFT_MOE, "moe_router.routing.soft_moe:SoftMoERouter",
        "Soft MoE: every slot takes a softmax-weighted mix of all tokens (Puigcerver et al.).",
        arguments={"slots_per_expert": "slots_per_expert", "temperature": "temperature"},
    ),
    RouterKindEntry(
        _K.MOE_ROUTER, "moe_router.routing.zeta:MLPTopKRouter",
        "Top-k over an MLP scorer, softmax or Gumbel (zeta's MoERouter).",
        config_fields=frozenset({"top_k", "renormalize", "routed_scaling_factor",
                                 "renormalize_eps"}),
        arguments={"hidden_layers": "hidden_layers", "mechanism": "mechanism",
                   "mlp_layers": "mlp_layers", "output_bias": "output_bias",
                   "skip_expert": "skip_expert", "use_correction_bias": "use_correction_bias"},
    ),
    RouterKindEntry(
        _K.DYNAMIC, "moe_router.routing.dynamic:DynamicRouter",
        "The seed's dynamic router: a per-token expert count from a complexity estimate.",
        construction=Construction.DIMENSIONS,
        arguments=_DYNAMIC_ARGUMENTS,
        extra_arguments="estimator_options",
    ),
    RouterKindEntry(
        _K.ADAPTIVE, "moe_router.routing.dynamic:AdaptiveRouter",
        "The dynamic router with a complexity threshold that adapts while it serves.",
        construction=Construction.DIMENSIONS,
        arguments={**_DYNAMIC_ARGUMENTS, "adaptation_rate": "adaptation_rate"},
        extra_arguments="estimator_options",
    ),
    RouterKindEntry(
        _K.FAULT_INJECTION, "moe_router.loading.fault_injection:FaultInjectingRouter",
        "Top-k that fails or stalls while a file exists (tests and incident rehearsals).",
        config_fields=_TOP_K_CONFIG,
        arguments={"fail_while_file_exists": "fault.fail_while_file_exists",
                   "slow_while_file_exists": "fault.slow_while_file_exists",
                   "slow_ms": "fault.slow_ms"},
        test_only=True,
    ),
    RouterKindEntry(
        _K.HASH, "moe_router.routing.hashed:HashRouter",
        "Experts by token id from a fixed table, weighted by the gate (DeepSeek-V4 hash layers).",
        config_fields=frozenset({"top_k", "scoring", "renormalize", "routed_scaling_factor",
                                 "renormalize_eps", "gate_bias", "logit_multiplier"}),
        arguments={"vocab_size": "vocab_size"},
    ),
    RouterKindEntry(
        _K.SPARSEMIXER, "moe_router.routing.sparsemixer:SparseMixerRouter",
        "Top-2 with SparseMixer's deterministic inference weights (PhiMoE).",
        config_fields=frozenset({"top_k", "routed_scaling_factor", "gate_bias"}),
        arguments={"sparsemixer_eps": "sparsemixer_eps"},
    ),
)

ROUTER_KINDS: Mapping[RoutingMethod, RouterKindEntry] = MappingProxyType(
    {row.kind: row for row in _ROWS}
)
"""The kind table: one row per :class:`RoutingMethod` value, in enum order (a test checks)."""


def kind_entry(kind: RoutingMethod | str) -> RouterKindEntry:
    """The row of ``kind`` (an enum member or its value); RouterConfigurationError naming
    the kinds otherwise."""
    try:
        return ROUTER_KINDS[RoutingMethod(kind)]
    except ValueError:
        allowed = ", ".join(repr(k.value) for k in RoutingMethod)
        raise RouterConfigurationError(f"kind: must be one of {allowed}, got {kind!r}") \
            from None


def kinds_using(spec_field: str) -> frozenset[RoutingMethod]:
    """The kinds that read RouterSpec key ``spec_field`` (empty: a key no kind reads)."""
    return frozenset(row.kind for row in _ROWS if spec_field in row.spec_fields)
