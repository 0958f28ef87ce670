"""Where configuration values come from: the YAML file, the environment, overrides.

Each source becomes a :class:`Layer` (a nested mapping plus how to name its keys in
messages); :func:`merge_into` folds layers into one tree while recording, per key path,
which source set it, so :class:`Context` can name the file, ``environment variable X``
or ``overrides`` in every error. The precedence order lives in :mod:`moe_router.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Any, NoReturn, Union, get_args, get_origin, get_type_hints

import yaml

from moe_router.config.schema import ALIASES, RouterKind, RouterSpec, ServiceConfig
from moe_router.errors import RouterConfigurationError

__all__ = [
    "EMBEDDED_LABEL",
    "Layer",
    "Origin",
    "Context",
    "default_config_text",
    "file_layer",
    "env_layer",
    "override_layer",
    "merge_into",
    "schema",
    "settable",
    "unwrap",
    "env_fields",
    "hint_at",
    "parse_text",
    "describe",
]

EMBEDDED_LABEL = "<embedded default config.yaml>"
"""How messages name the embedded default config."""


def default_config_text() -> str:
    """The embedded default config.yaml (package data; identical to the repository's)."""
    return resources.files("moe_router.config").joinpath("default_config.yaml").read_text("utf-8")



@dataclass
class Layer:
    """One source: a nested mapping, its label in messages, and how to show its paths."""

    label: str
    tree: dict[str, Any]
    base_dir: Path
    labels: dict[str, str] = field(default_factory=dict)  # per-key labels (env variables)
    renames: dict[str, str] = field(default_factory=dict)  # stored path -> written path


@dataclass(frozen=True)
class Origin:
    """Which source set a key: its label, its base directory, how it wrote key paths."""

    label: str
    base_dir: Path
    renames: Mapping[str, str]


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key written twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def file_layer(path: str | Path | None) -> Layer:
    """The YAML file (or the embedded default) as a layer: seed shorthand and aliases resolved."""
    if path is None:
        label, base_dir, text = EMBEDDED_LABEL, Path.cwd(), default_config_text()
    else:
        file = Path(path).expanduser()
        label = str(path)
        if not file.is_file():
            raise RouterConfigurationError(f"{label}: config file not found ({file.absolute()})")
        base_dir, text = file.absolute().parent, file.read_text("utf-8")
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RouterConfigurationError(f"{label}: invalid YAML{where}: {problem}") from None
    if not isinstance(tree, dict):
        raise RouterConfigurationError(
            f"{label}: the top level must be a mapping of sections, got {describe(tree)}"
        )
    layer = Layer(label, tree, base_dir)
    if "router" in tree:  # the seed's single-router shorthand
        block = tree.pop("router")
        if "routers" in tree:
            raise RouterConfigurationError(
                f"{label}: router: use the seed's 'router:' block or a 'routers:' list, not both"
            )
        if not isinstance(block, Mapping):
            raise RouterConfigurationError(f"{label}: router: must be a mapping, got "
                                           f"{describe(block)}")
        tree["routers"] = [{"name": "default", "kind": RouterKind.DYNAMIC.value, **block}]
        layer.renames["routers[0]"] = "router"
    _apply_aliases(layer)
    return layer


def env_layer(env: Mapping[str, str]) -> Layer:
    """The ``DYNAMIC_MOE_*`` variables as a layer, each value parsed to its key's type."""
    layer = Layer("environment", {}, Path.cwd())
    for var, (dotted, hint) in env_fields().items():
        text = env.get(var, "").strip()
        if not text:  # unset and empty both mean "not given"
            continue
        label = f"environment variable {var}"
        _set_dotted(layer.tree, dotted, parse_text(text, hint, f"{label}: {dotted}"))
        layer.labels[dotted] = label
    return layer


def override_layer(overrides: Mapping[str, Any]) -> Layer:
    """Explicit dotted-key overrides (CLI arguments) as a layer."""
    layer = Layer("overrides", {}, Path.cwd())
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise RouterConfigurationError(f"overrides: keys must be dotted names, got {key!r}")
        hint = hint_at(key)
        if isinstance(value, str) and hint is not None and unwrap(hint) in (bool, int, float):
            value = parse_text(value.strip(), hint, f"overrides: {key}")
        _set_dotted(layer.tree, key, value, label="overrides")
    _apply_aliases(layer)
    return layer


def _apply_aliases(layer: Layer) -> None:
    """Move alias keys onto their targets; a source setting both differently is an error."""
    tree = layer.tree
    for alias, target in ALIASES.items():
        a_section, a_key = alias.split(".")
        t_section, t_key = target.split(".")
        section = tree.get(a_section)
        if not isinstance(section, dict) or a_key not in section:
            continue
        value = section.pop(a_key)
        if tree.get(t_section) is None:
            tree[t_section] = {}
        destination = tree[t_section]
        if not isinstance(destination, dict):
            continue  # the builder reports the malformed section
        if t_key in destination and (
            destination[t_key] != value or type(destination[t_key]) is not type(value)
        ):
            raise RouterConfigurationError(
                f"{layer.label}: {alias}: is an alias of {target}, which is also set, to a "
                f"different value ({value!r} vs {destination[t_key]!r}); remove one of them"
            )
        destination[t_key] = value
        layer.renames[target] = alias


def merge_into(
    dst: dict[str, Any], src: Mapping[str, Any], prefix: str, layer: Layer,
    origins: dict[str, Origin],
) -> None:
    """Fold ``src`` into ``dst`` (mappings merge, other values replace), recording origins."""
    for key, value in src.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            merge_into(dst[key], value, path, layer, origins)
            continue
        if isinstance(value, Mapping):
            dst[key] = {}
            merge_into(dst[key], value, path, layer, origins)
        else:
            dst[key] = value
        label = layer.labels.get(path, layer.label)
        origins[path] = Origin(label, layer.base_dir, layer.renames)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, label: str = "") -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RouterConfigurationError(f"{label}: {dotted}: conflicts with {part!r} "
                                           "given as a value")
        node = child
    node[last] = value


# --------------------------------------------------------------------------- context
class Context:
    """Finds where a key path's value came from, to name it in every error."""

    def __init__(
        self, origins: Mapping[str, Origin], from_file: Layer, env: Mapping[str, str]
    ) -> None:
        self._origins = origins
        self._fallback = Origin(from_file.label, from_file.base_dir, from_file.renames)
        self.file_label = from_file.label
        self.env = env  # for the API-key variable, whose name is itself configured

    def origin(self, path: str) -> Origin:
        """The source that set ``path`` (or the nearest enclosing key)."""
        for prefix in reversed(_prefixes(path)):
            if prefix in self._origins:
                return self._origins[prefix]
        return self._fallback

    def display(self, path: str) -> str:
        """``label: written.path`` for a stored key path."""
        origin = self.origin(path)
        shown = path
        for prefix in reversed(_prefixes(path)):
            if prefix in origin.renames:
                shown = origin.renames[prefix] + path[len(prefix):]
                break
        return f"{origin.label}: {shown}"

    def fail(self, path: str, message: str) -> NoReturn:
        """Raise RouterConfigurationError as ``source: key.path: message``."""
        raise RouterConfigurationError(f"{self.display(path)}: {message}")

    def unknown(self, path: str, key: object, allowed: set[str]) -> NoReturn:
        """Raise for an unknown key, suggesting the closest valid one."""
        close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
        valid = ", ".join(sorted(allowed))
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {valid}"
        self.fail(path, f"unknown key; {hint}")

    def resolve(self, path: str, value: str) -> Path:
        """A path value, relative ones resolved against its source's directory."""
        file = Path(value).expanduser()
        return file if file.is_absolute() else self.origin(path).base_dir / file


def _prefixes(path: str) -> list[str]:
    """``a.b[2].c`` -> ``[a, a.b, a.b[2], a.b[2].c]``."""
    cuts = [m.start() for m in re.finditer(r"[.\[]", path) if m.start() > 0]
    return [path[:cut] for cut in cuts] + [path]


# --------------------------------------------------------------------------- typing
@cache
def schema(cls: type) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """Field name -> (dataclass field, resolved type) of a config dataclass."""
    hints = get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in fields(cls)}


def settable(cls: type) -> set[str]:
    """The keys a source may write for ``cls`` (not derived, not alias mirrors)."""
    return {
        name for name, (f, _) in schema(cls).items()
        if not f.metadata.get("derived") and not f.metadata.get("alias_of")
    }


def unwrap(hint: Any) -> Any:
    """``X | None`` -> ``X``."""
    if get_origin(hint) in (Union, UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


@cache
def env_fields() -> dict[str, tuple[str, Any]]:
    """``DYNAMIC_MOE_X`` -> (dotted key, type), from the ``env=`` field metadata."""
    found: dict[str, tuple[str, Any]] = {}

    def walk(cls: type, prefix: str) -> None:
        for name, (f, hint) in schema(cls).items():
            if f.metadata.get("env"):
                found[f.metadata["env"]] = (prefix + name, hint)
            if is_dataclass(hint) and cls is not RouterSpec:
                walk(hint, f"{prefix}{name}.")  # type: ignore[arg-type]

    walk(ServiceConfig, "")
    return found


def hint_at(dotted: str) -> Any | None:
    """The type of a dotted key of ServiceConfig, or None when it names no field."""
    cls: Any = ServiceConfig
    hint = None
    for part in dotted.split("."):
        if not isinstance(cls, type) or not is_dataclass(cls) or cls is RouterSpec:
            return None
        entry = schema(cls).get(part)
        if entry is None:
            alias = ALIASES.get(dotted)
            return hint_at(alias) if alias else None
        hint = entry[1]
        cls = unwrap(hint)
    return hint


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_text(text: str, hint: Any, label: str) -> Any:
    """An environment (or string override) value -> the key's scalar type."""
    kind = unwrap(hint)
    if kind is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise RouterConfigurationError(
            f"{label}: must be a boolean (true/false, 1/0, yes/no), got {text!r}"
        )
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise RouterConfigurationError(f"{label}: must be {what}, got {text!r}") from None
    return text


def describe(value: object) -> str:
    """``value (type)`` for error messages."""
    return f"{value!r} ({type(value).__name__})"
