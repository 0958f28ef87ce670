"""A router entry from a Hugging Face checkpoint directory (config.json + safetensors).

``router_entry(model_dir, part)`` reads ``config.json``, whose ``model_type`` selects the
family in :data:`moe_router.loading.checkpoint_families.FAMILIES`; the family's
translator turns the config's fields into router keys (kind, experts, k, groups,
scaling, normalisation, bias), and the checkpoint's tensor names say which layers are
MoE layers and under which prefix their gate lives. The result is the config.yaml keys
of one router entry, ``weights`` included; :func:`describe_entry` writes it as YAML a
user can check and paste.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from moe_router.errors import RouterConfigurationError
from moe_router.loading.checkpoint_config import (
    ModelConfig,
    moe_layers,
    read_config,
    read_tensor_names,
    sub_config,
)
from moe_router.loading.checkpoint_families import FAMILIES

__all__ = ["router_entry", "describe_entry"]


def router_entry(model_dir: Path, part: str | None = None) -> dict[str, Any]:
    """The config.yaml keys of the router entry ``model_dir``'s checkpoint implies.

    part: which router of the checkpoint, for families with more than one (the
    family's first when None). Returns plain YAML-able values: kind, input_dim,
    num_experts, layers, the kind's options and ``weights`` {path, gate, bias,
    layer_offset or checkpoint_layers, tensors}.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    model_type = config["model_type"]
    family = FAMILIES.get(model_type)
    if family is None:
        raise RouterConfigurationError(
            f"model_type {model_type!r}: not a family this server maps (supported: "
            f"{', '.join(sorted(FAMILIES))}); write the router entry by hand"
        )
    parts = {p.name: p for p in family.parts}
    chosen = parts.get(part) if part is not None else family.parts[0]
    if chosen is None:
        raise RouterConfigurationError(
            f"model_type {model_type!r}: no part {part!r}; it has {', '.join(parts)}"
        )
    cfg = ModelConfig(model_type, sub_config(config, chosen.config_path))
    entry = chosen.translate(cfg)
    tensors = read_tensor_names(model_dir)
    num_layers = cfg.get("num_hidden_layers", "n_layers", "num_layers")
    try:
        prefix, suffix, layers = moe_layers(
            tensors.names, chosen.gate, chosen.prefix_has,
            num_layers if isinstance(num_layers, int) else None,
        )
    except RouterConfigurationError as exc:
        cfg.fail(str(exc))
    if chosen.layer_has is not None:
        layers = [L for L in layers if (f"{prefix}{L}.{chosen.layer_has}" in tensors.names)
                  is chosen.layer_has_wanted]
        if not layers:
            cfg.fail(f"no layer of part {chosen.name!r} (layers with {chosen.layer_has!r})")
    extra = dict(entry.pop("tensors", {}))
    bias = entry.pop("bias", None)
    for name, tensor_suffix in [*extra.items(), ("bias", bias)]:
        if tensor_suffix is None:
            continue
        absent = [L for L in layers if f"{prefix}{L}.{tensor_suffix}" not in tensors.names]
        if absent:
            cfg.fail(f"layer {absent[0]} has {prefix}{absent[0]}.{suffix} but no "
                     f"{tensor_suffix!r} ({name})")
    weights: dict[str, Any] = {"path": str(tensors.path), "gate": f"{prefix}{{layer}}.{suffix}"}
    if bias is not None:
        weights["bias"] = f"{prefix}{{layer}}.{bias}"
    if layers == list(range(layers[0], layers[0] + len(layers))):
        weights["layer_offset"] = layers[0]
    else:
        weights["checkpoint_layers"] = layers
    if extra:
        weights["tensors"] = {name: f"{prefix}{{layer}}.{s}" for name, s in extra.items()}
    hidden = cfg.require_int("hidden_size", "d_model")
    return {**entry, "input_dim": hidden, "layers": len(layers), "weights": weights}


def describe_entry(model_dir: Path, part: str | None = None, name: str | None = None) -> str:
    """The YAML of a ``routers:`` list holding the entry ``model_dir`` implies (what
    ``moe-router describe`` prints): every key spelled out, ``model_dir`` left out so the
    entry stands on its own."""
    entry = router_entry(model_dir, part)
    model_type = read_config(Path(model_dir))["model_type"]
    default_name = model_type.replace(".", "-").lower()
    if part is not None:
        default_name += f"-{part}"
    ordered = {"name": name or default_name, **entry}
    return yaml.safe_dump({"routers": [ordered]}, sort_keys=False, default_flow_style=False)
