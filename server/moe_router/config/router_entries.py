"""The router entries of config.yaml: each ``routers[i]`` mapping -> a checked RouterSpec.

Kind-specific keys are allowed only for the kinds that read them (the kind table), the
weights source is checked (a real safetensors file, templates with ``{layer}``, a
checkpoint name for every router tensor), and the router's own constructor runs on the
meta device so its checks fire at load with the entry's key path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moe_router.config.schema import (
    BatchingConfig,
    FaultSpec,
    RouterKind,
    RouterSpec,
    TestingConfig,
    WeightsSpec,
)
from moe_router.config.sources import Context, describe, schema
from moe_router.config.typed_values import build_partial, convert
from moe_router.errors import RouterConfigurationError
from moe_router.loading.checkpoints import router_entry
from moe_router.routing.kinds import kind_entry, kinds_using

__all__ = ["build_routers", "router_error"]


def build_routers(
    raw: Any, ctx: Context, batching: BatchingConfig, testing: TestingConfig
) -> tuple[RouterSpec, ...]:
    if not isinstance(raw, (list, tuple)) or not raw:
        ctx.fail("routers", "must be a non-empty list of routers (name, kind, input_dim, "
                 f"num_experts, ...), got {describe(raw)}")
    specs: list[RouterSpec] = []
    first_index: dict[str, int] = {}
    for i, item in enumerate(raw):
        spec = _build_router(item, f"routers[{i}]", ctx, batching, testing)
        if spec.name in first_index:
            ctx.fail(f"routers[{i}].name", f"duplicate router name {spec.name!r} (also "
                     f"routers[{first_index[spec.name]}]); names must be unique")
        first_index[spec.name] = i
        specs.append(spec)
    return tuple(specs)


_REQUIRED = ("name", "kind", "input_dim", "num_experts")


def _build_router(
    raw: Any, path: str, ctx: Context, batching: BatchingConfig, testing: TestingConfig
) -> RouterSpec:
    if not isinstance(raw, Mapping):
        ctx.fail(path, f"must be a mapping with {', '.join(_REQUIRED)}, got {describe(raw)}")
    if raw.get("model_dir") is not None:
        raw = _expand_model_dir(raw, path, ctx)
    for key in _REQUIRED:
        if key not in raw:
            ctx.fail(path, f"missing required key {key!r}")
    kind = convert(raw["kind"], RouterKind, f"{path}.kind", ctx, {})
    if kind_entry(kind).test_only and not testing.enable_fault_injection:
        ctx.fail(f"{path}.kind", f"{kind.value!r} routers exist only for tests; set "
                 "testing.enable_fault_injection: true to allow them")
    spec_fields = schema(RouterSpec)
    for key in raw:
        kinds = spec_fields[key][0].metadata["kinds"] if key in spec_fields else None
        if kinds is not None and kind not in kinds:
            used_by = ", ".join(sorted(k.value for k in kinds))
            ctx.fail(f"{path}.{key}", f"is not used by kind {kind.value!r} (only by {used_by}); "
                     "remove it")
    rest = {k: v for k, v in raw.items() if k not in ("batching", "weights")}
    values = build_partial(RouterSpec, rest, path, ctx)
    overrides = build_partial(BatchingConfig, raw.get("batching"), f"{path}.batching", ctx)
    values["batching"] = replace(batching, **overrides)
    values["weights"] = _build_weights(raw.get("weights"), f"{path}.weights", ctx)
    if kind is RouterKind.FAULT_INJECTION and values.get("fault") is None:
        values["fault"] = FaultSpec()
    spec = RouterSpec(**values, source=ctx.display(path))
    _check_router(spec, path, ctx)
    return spec


def _expand_model_dir(raw: Mapping[str, Any], path: str, ctx: Context) -> dict[str, Any]:
    """The entry ``model_dir`` implies (:func:`moe_router.loading.checkpoints.router_entry`)
    with the keys written in config.yaml over it.

    A key written here wins; ``weights`` keys merge one by one (``init`` or ``path``
    written here replace the checkpoint's weights whole). Keys the checkpoint implied
    that the final kind does not read are dropped (a user who sets another ``kind``
    keeps only what applies to it).
    """
    model_dir = convert(raw["model_dir"], Path, f"{path}.model_dir", ctx, {})
    if not model_dir.is_dir():
        ctx.fail(f"{path}.model_dir", f"not a directory: {model_dir}")
    part = raw.get("model_part")
    if part is not None and not isinstance(part, str):
        ctx.fail(f"{path}.model_part", f"must be a string, got {describe(part)}")
    try:
        derived = router_entry(model_dir, part)
    except RouterConfigurationError as exc:
        ctx.fail(f"{path}.model_dir", str(exc))
    written_weights = raw.get("weights") or {}
    weights = dict(derived.pop("weights"))
    if isinstance(written_weights, Mapping) and not {"init", "path"} & set(written_weights):
        weights.update(written_weights)
    else:
        weights = written_weights  # type: ignore[assignment]
    kind = raw.get("kind", derived["kind"])
    try:
        reads = kind_entry(kind).spec_fields
    except RouterConfigurationError:
        reads = frozenset()  # the kind's own check names the bad value below
    spec_fields = schema(RouterSpec)
    kept = {key: value for key, value in derived.items()
            if spec_fields[key][0].metadata["kinds"] is None or key in reads}
    return {**kept, **raw, "weights": weights}


def _build_weights(raw: Any, path: str, ctx: Context) -> WeightsSpec:
    values = build_partial(WeightsSpec, raw, path, ctx)
    checkpoint = values.get("path")
    if checkpoint is None:
        if "init" in values and values["init"] is None:
            ctx.fail(path, "needs init: random or a path to a safetensors checkpoint")
        for key in ("gate", "bias", "layer_offset", "checkpoint_layers", "tensors"):
            if key in values:
                ctx.fail(f"{path}.{key}", "is used only with path (a checkpoint); set path or "
                         "remove it")
        return WeightsSpec(**values)
    if values.get("init") is not None:
        ctx.fail(f"{path}.init", "give either init: random or path, not both")
    if "seed" in values:
        ctx.fail(f"{path}.seed", "is used only with init: random; remove it")
    if not checkpoint.name.endswith((".safetensors", ".json")):
        ctx.fail(f"{path}.path", "must be a .safetensors file or a sharded "
                 f"model.safetensors.index.json, got {checkpoint.name!r} (pickle checkpoints "
                 "are never loaded; convert them with safetensors)")
    if not checkpoint.is_file():
        ctx.fail(f"{path}.path", f"checkpoint not found: {checkpoint}")
    if values.get("gate") is None:
        ctx.fail(f"{path}.gate", "is required with path: the gate weight's tensor name, e.g. "
                 "'model.layers.{layer}.mlp.gate.weight'")
    templates = {key: values.get(key) for key in ("gate", "bias")}
    templates |= {f"tensors.{name}": t for name, t in values.get("tensors", {}).items()}
    for key, template in templates.items():
        try:
            if template is not None:
                if not isinstance(template, str):
                    raise ValueError
                template.format(layer=0)
        except (KeyError, IndexError, ValueError):
            ctx.fail(f"{path}.{key}", "must be a tensor name whose only placeholder is "
                     f"{{layer}}, got {template!r}")
    if "checkpoint_layers" in values and "layer_offset" in values:
        ctx.fail(f"{path}.checkpoint_layers", "replaces layer_offset; give one of them")
    return WeightsSpec(**{**values, "init": None})


def _check_router(spec: RouterSpec, path: str, ctx: Context) -> None:
    """Cross-field checks of one router; RouterConfig's and the class's own are reused."""
    try:
        config = spec.router_config()
    except RouterConfigurationError as exc:
        raise RouterConfigurationError(router_error(spec.source, str(exc))) from None
    weights = spec.weights
    if weights.path is not None:
        if spec.layers > 1 and "{layer}" not in (weights.gate or ""):
            ctx.fail(f"{path}.weights.gate", "must contain '{layer}' when layers > 1 (or every "
                     "layer loads the same tensor)")
        if weights.bias is not None and not spec.use_correction_bias:
            ctx.fail(f"{path}.weights.bias", "needs use_correction_bias: true (kinds "
                     f"{', '.join(sorted(k.value for k in kinds_using('use_correction_bias')))})"
                     "; only such a router has an e_score_correction_bias")
        if weights.bias is None and spec.use_correction_bias:
            ctx.fail(f"{path}.weights.bias", "is required because use_correction_bias is true, "
                     "e.g. 'model.layers.{layer}.mlp.gate.e_score_correction_bias'")
        listed = weights.checkpoint_layers
        if listed is not None and len(listed) != spec.layers:
            ctx.fail(f"{path}.weights.checkpoint_layers", f"lists {len(listed)} layers but "
                     f"layers is {spec.layers}; give one checkpoint layer per served layer")
    entry = kind_entry(spec.kind)
    try:
        with torch.device("meta"):  # the class's own constructor checks, nothing allocated
            router = entry.construct(config, entry.arguments_from(spec))
    except RouterConfigurationError as exc:
        raise RouterConfigurationError(router_error(spec.source, str(exc))) from None
    if weights.path is not None:
        _check_checkpoint_tensors(router, spec, path, ctx)


def _check_checkpoint_tensors(router: Any, spec: RouterSpec, path: str, ctx: Context) -> None:
    """Every persistent tensor of the router has a checkpoint name, and no name is extra."""
    weights = spec.weights
    own = set(router.state_dict())
    named = {router.gate_weight_name(), *weights.tensors}
    if weights.bias is not None:
        named.add("e_score_correction_bias")
    unknown = sorted(set(weights.tensors) - own)
    if unknown:
        ctx.fail(f"{path}.weights.tensors", f"{', '.join(unknown)}: not tensors of kind "
                 f"{spec.kind.value!r} with these options; it has {', '.join(sorted(own))}")
    missing = sorted(own - named)
    if missing:
        ctx.fail(f"{path}.weights.tensors", f"has no checkpoint name for {', '.join(missing)}; "
                 "every router tensor must come from the checkpoint (name -> template with "
                 "{layer})")


def router_error(source: str, message: str) -> str:
    """Prefix a router's own error (``"top_k: must be ..."``) with the spec's key path."""
    match = re.match(r"([a-z_]+): (.*)", message, re.S)
    if match:
        key = "input_dim" if match[1] == "hidden_size" else match[1]
        if key in schema(RouterSpec):
            return f"{source}.{key}: {match[2]}"
    return f"{source}: {message}"
