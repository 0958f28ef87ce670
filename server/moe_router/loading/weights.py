"""Gate weights from safetensors checkpoints (a single file or a sharded index), never pickle.

Only the tensors a layer needs are read: for ``model.safetensors.index.json`` the
``weight_map`` names the shard, and ``safe_open`` reads just that tensor from it.
Every failure is a :class:`RouterConfigurationError` naming the tensor and the file.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moe_router.config import WeightsSpec
from moe_router.errors import RouterConfigurationError
from moe_router.routing.base import RouterBase

__all__ = [
    "TensorLocation",
    "checkpoint_layer",
    "locate_gate_tensors",
    "locate_router_tensors",
    "read_tensor",
    "load_gate_tensors",
    "apply_weights",
    "apply_tensor",
    "load_router_weights",
]


@dataclass(frozen=True)
class TensorLocation:
    """One tensor of a checkpoint: its name and the safetensors file holding it."""

    name: str
    file: Path

    def __str__(self) -> str:
        return f"{self.name} in {self.file.name}"


def locate_gate_tensors(
    spec: WeightsSpec, layer: int
) -> tuple[TensorLocation, TensorLocation | None]:
    """Where layer ``layer``'s gate weight (and correction bias, if named) live.

    The checkpoint layer is ``spec.layer_offset + layer``; a sharded index is read to
    find each tensor's shard.
    """
    located = locate_router_tensors(spec, layer, "gate.weight", include_extra=False)
    return located["gate.weight"], located.get("e_score_correction_bias")


def checkpoint_layer(spec: WeightsSpec, layer: int) -> int:
    """The checkpoint layer index of our layer ``layer``: ``checkpoint_layers[layer]``
    when listed, else ``layer_offset + layer``."""
    if spec.checkpoint_layers is not None:
        if not 0 <= layer < len(spec.checkpoint_layers):
            raise RouterConfigurationError(
                f"layer {layer} is not in checkpoint_layers (it lists "
                f"{len(spec.checkpoint_layers)} layers)"
            )
        return spec.checkpoint_layers[layer]
    return spec.layer_offset + layer


def locate_router_tensors(
    spec: WeightsSpec, layer: int, gate_name: str, include_extra: bool = True
) -> dict[str, TensorLocation]:
    """Router state_dict name -> where layer ``layer``'s tensor lives in the checkpoint.

    ``gate`` fills ``gate_name`` (the router's gate weight), ``bias`` fills
    ``e_score_correction_bias`` and every ``tensors`` entry its own name. A sharded
    index is read to find each tensor's shard.
    """
    if spec.path is None or spec.gate is None:
        raise RouterConfigurationError("no checkpoint path and gate name to load from")
    at = checkpoint_layer(spec, layer)
    templates = {gate_name: spec.gate}
    if spec.bias is not None:
        templates["e_score_correction_bias"] = spec.bias
    if include_extra:
        templates.update(spec.tensors)
    names = {ours: template.format(layer=at) for ours, template in templates.items()}
    if not spec.path.is_file():
        raise RouterConfigurationError(f"checkpoint not found: {spec.path}")
    if not spec.path.name.endswith(".json"):
        return {ours: TensorLocation(name, spec.path) for ours, name in names.items()}
    weight_map = _read_weight_map(spec.path)
    located = {}
    for ours, name in names.items():
        if name not in weight_map:
            raise RouterConfigurationError(
                f"{name} is not in the weight_map of {spec.path}{_closest(name, weight_map)}"
            )
        located[ours] = TensorLocation(name, spec.path.parent / weight_map[name])
    return located


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RouterConfigurationError(
            f"{index}: not a safetensors index (expected JSON with a 'weight_map' object): {exc}"
        ) from None
    if not isinstance(weight_map, dict):
        raise RouterConfigurationError(f"{index}: 'weight_map' must map tensor names to files")
    return weight_map


def _closest(name: str, names: object) -> str:
    close = difflib.get_close_matches(name, sorted(names), n=1)  # type: ignore[call-overload]
    return f"; closest: {close[0]}" if close else ""


def read_tensor(location: TensorLocation) -> torch.Tensor:
    """Read exactly one tensor from a safetensors file, on the CPU."""
    if not location.file.is_file():
        raise RouterConfigurationError(
            f"{location.name}: shard {location.file} does not exist"
        )
    try:
        with safe_open(str(location.file), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if location.name not in keys:
                raise RouterConfigurationError(
                    f"{location.name} is not in {location.file}{_closest(location.name, keys)}"
                )
            return f.get_tensor(location.name)
    except SafetensorError as exc:
        raise RouterConfigurationError(
            f"{location.file}: not a readable safetensors file ({exc})"
        ) from None


def load_gate_tensors(
    spec: WeightsSpec, layer: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gate weight ``[E, D]`` and optional correction bias ``[E]`` of layer ``layer``."""
    gate, bias = locate_gate_tensors(spec, layer)
    return read_tensor(gate), None if bias is None else read_tensor(bias)


def apply_weights(
    router: RouterBase,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    weight_origin: str = "gate weight",
    bias_origin: str = "e_score_correction_bias",
) -> None:
    """Copy ``weight`` into ``router.gate.weight`` and ``bias`` into its correction bias.

    Shapes must match exactly (``[E, D]``; Soft MoE ``[E * slots, D]``; bias ``[E]``) and
    values must be finite; the origins name the tensors in error messages.
    """
    target = router.gate.weight
    rows = "num_experts" if target.shape[0] == router.num_experts else "num_experts * slots"
    _check(weight, tuple(target.shape), f"({rows}, input_dim)", weight_origin)
    buffer = getattr(router, "e_score_correction_bias", None)
    if bias is not None:
        if not isinstance(buffer, torch.Tensor):
            raise RouterConfigurationError(
                f"{bias_origin}: {type(router).__name__} has no e_score_correction_bias "
                "(set use_correction_bias: true)"
            )
        _check(bias, tuple(buffer.shape), "(num_experts,)", bias_origin)
    with torch.no_grad():
        target.copy_(weight.to(device=target.device, dtype=target.dtype))
        if bias is not None and isinstance(buffer, torch.Tensor):
            buffer.copy_(bias.to(device=buffer.device, dtype=buffer.dtype))


def _check(tensor: torch.Tensor, expected: tuple[int, ...], dims: str, origin: str) -> None:
    if tuple(tensor.shape) != expected:
        raise RouterConfigurationError(
            f"{origin} has shape {list(tensor.shape)}, expected {list(expected)}"
            + (f" {dims}" if dims else "")
        )
    if not tensor.is_floating_point():
        raise RouterConfigurationError(f"{origin} has dtype {tensor.dtype}, expected floating")
    if not bool(torch.isfinite(tensor).all()):
        raise RouterConfigurationError(f"{origin} contains NaN or infinite values")


def apply_tensor(router: RouterBase, name: str, tensor: torch.Tensor, origin: str) -> None:
    """Copy ``tensor`` into the router's parameter or buffer ``name`` (exact shape).

    Floating targets take finite floating tensors (upcast to the target's dtype);
    integer targets (a hash router's ``token_experts``) take integer tensors whose values
    are expert ids in [0, E).
    """
    targets = dict(router.named_parameters()) | dict(router.named_buffers())
    if name not in targets:
        raise RouterConfigurationError(
            f"{origin}: {type(router).__name__} has no tensor {name!r}; it has "
            f"{', '.join(sorted(router.state_dict()))}"
        )
    target = targets[name]
    while tensor.dim() > target.dim() and tensor.shape[0] == 1:
        tensor = tensor[0]  # e.g. Ernie 4.5's [1, E] correction bias for our [E]
    dims = ""
    if name == router.gate_weight_name():
        dims = ("(num_experts, input_dim)" if target.shape[0] == router.num_experts
                else "(scored experts, input_dim)")
    if target.is_floating_point():
        _check(tensor, tuple(target.shape), dims, origin)
    else:
        if tuple(tensor.shape) != tuple(target.shape):
            raise RouterConfigurationError(
                f"{origin} has shape {list(tensor.shape)}, expected {list(target.shape)}"
            )
        if tensor.is_floating_point() or tensor.dtype == torch.bool:
            raise RouterConfigurationError(f"{origin} has dtype {tensor.dtype}, expected integer")
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= router.num_experts):
            raise RouterConfigurationError(
                f"{origin} holds expert ids in [{int(tensor.min())}, {int(tensor.max())}], "
                f"expected [0, {router.num_experts})"
            )
    with torch.no_grad():
        target.copy_(tensor.to(device=target.device, dtype=target.dtype))


def load_router_weights(router: RouterBase, spec: WeightsSpec, layer: int) -> None:
    """Load layer ``layer``'s checkpoint tensors into ``router`` (shape-checked).

    Every persistent tensor of the router must come from the checkpoint (a tensor left
    at its initial value would route silently wrong): the gate, the correction bias and
    ``weights.tensors`` together must name them all.
    """
    gate_name = router.gate_weight_name()
    located = locate_router_tensors(spec, layer, gate_name)
    missing = sorted(set(router.state_dict()) - set(located))
    if missing:
        raise RouterConfigurationError(
            f"tensors: {', '.join(missing)} of {type(router).__name__} have no checkpoint "
            "tensor; name each in weights.tensors (router name -> checkpoint name template)"
        )
    for name, location in located.items():
        apply_tensor(router, name, read_tensor(location), str(location))
