"""Reading a Hugging Face checkpoint directory: its config.json, its tensor names, and
which layers hold a given router tensor under which prefix.

Local files only (``config.json``, ``model.safetensors.index.json`` or the safetensors
headers); nothing is downloaded and no tensor is read. Errors are
:class:`RouterConfigurationError`; :class:`ModelConfig` words them as one line naming
the model type.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from safetensors import SafetensorError, safe_open

from moe_router.errors import RouterConfigurationError

__all__ = ["ModelConfig", "CheckpointTensors", "read_config", "read_tensor_names", "sub_config",
           "moe_layers"]

_MISSING = object()
_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|blocks)\.)(?P<layer>\d+)\.(?P<rest>.+)$")
#: Prefixes of towers that are not the language model (their layers are not ours).
_OTHER_TOWERS = ("vision", "visual", "audio", "mtp", "image", "speech", "code_predictor")


@dataclass(frozen=True)
class ModelConfig:
    """The (text) config of a checkpoint: ``model_type`` and its fields."""

    model_type: str
    values: Mapping[str, Any]

    def get(self, *names: str, default: Any = None) -> Any:
        """The first of ``names`` the config sets (not null), else ``default``."""
        for name in names:
            value = self.values.get(name)
            if value is not None:
                return value
        return default

    def require(self, *names: str) -> Any:
        """The first of ``names`` the config sets; an error naming the first otherwise."""
        value = self.get(*names, default=_MISSING)
        if value is _MISSING:
            self.fail(f"config.json has no {names[0]!r}" + (
                f" (nor {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""))
        return value

    def require_int(self, *names: str) -> int:
        """``require`` for an integer field (one value for every layer)."""
        value = self.require(*names)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{names[0]} {value!r} is not one integer for every layer; a router "
                      "entry serves layers of one shape (write one entry per shape by hand)")
        return value

    def fail(self, why: str) -> NoReturn:
        """Raise the one-line error of this checkpoint."""
        raise RouterConfigurationError(f"model_type {self.model_type!r}: {why}")

    def unsupported(self, option: str, value: Any, needs: str) -> NoReturn:
        """A config value the router kinds cannot express: say which and what it needs."""
        self.fail(f"{option}={value!r} cannot be expressed: {needs}")


@dataclass(frozen=True)
class CheckpointTensors:
    """The tensor names of a checkpoint and the file to name in ``weights.path``."""

    names: frozenset[str]
    path: Path


def read_tensor_names(model_dir: Path) -> CheckpointTensors:
    """Every tensor name of the checkpoint: from ``model.safetensors.index.json`` when
    present (the sharded layout), else from the one ``*.safetensors`` file's header."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RouterConfigurationError(f"{index}: not a safetensors index ({exc})") from None
        return CheckpointTensors(frozenset(weight_map), index)
    files = sorted(model_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise RouterConfigurationError(
            f"{model_dir}: expected model.safetensors.index.json or exactly one .safetensors "
            f"file, found {len(files)} .safetensors files (pickle checkpoints are never loaded)"
        )
    try:
        with safe_open(str(files[0]), framework="pt", device="cpu") as f:
            return CheckpointTensors(frozenset(f.keys()), files[0])
    except SafetensorError as exc:
        raise RouterConfigurationError(f"{files[0]}: not a readable safetensors file ({exc})") \
            from None


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise RouterConfigurationError(
            f"{model_dir}: not a Hugging Face model directory (no config.json)"
        )
    try:
        config = json.loads(path.read_text("utf-8"))
    except ValueError as exc:
        raise RouterConfigurationError(f"{path}: not JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise RouterConfigurationError(f"{path}: has no model_type")
    return config


def sub_config(config: Mapping[str, Any], path: Sequence[str]) -> Mapping[str, Any]:
    """The nested config at ``path`` (e.g. ``("text_config",)``); the top level when a
    checkpoint writes the text fields there (older exports)."""
    node: Any = config
    for key in path:
        if not isinstance(node, Mapping) or not isinstance(node.get(key), Mapping):
            return config
        node = node[key]
    return node


def moe_layers(
    names: frozenset[str], suffixes: Sequence[str], prefix_has: str | None,
    num_layers: int | None,
) -> tuple[str, str, list[int]]:
    """(prefix, suffix, layer indices) of the tensors ``<prefix><L>.<suffix>``.

    The first of ``suffixes`` any layer has wins (checkpoints of one family were saved
    under more than one name). Prefixes of other towers (vision, audio, MTP) are left
    out; ``prefix_has`` keeps only prefixes containing it (``thinker``, ``talker``);
    layers at or past ``num_layers`` are MTP modules, not decoder layers.
    """
    for suffix in suffixes:
        found: dict[str, list[int]] = {}
        for name in names:
            match = _LAYER.match(name)
            if match is None or match["rest"] != suffix:
                continue
            prefix = match["prefix"]
            if prefix_has is not None and prefix_has not in prefix:
                continue
            if prefix_has is None and any(t in prefix for t in _OTHER_TOWERS):
                continue
            layer = int(match["layer"])
            if num_layers is None or layer < num_layers:
                found.setdefault(prefix, []).append(layer)
        if len(found) > 1:
            raise RouterConfigurationError(
                f"the gate {suffix!r} is under more than one prefix ({', '.join(sorted(found))})"
            )
        if found:
            prefix, layers = found.popitem()
            return prefix, suffix, sorted(layers)
    raise RouterConfigurationError(f"no layer has a gate tensor named like {suffixes[0]!r}")
