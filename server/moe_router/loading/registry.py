"""Builds the routers config.yaml describes: the class per kind, its weights, its device.

The class of each kind and its constructor arguments come from the kind table
(:data:`moe_router.routing.kinds.ROUTER_KINDS`), which imports a class only when a router
of its kind is built. Random weights are deterministic: layer L of a router is
initialised from ``seed + L``, so every replica serves the same router and reports the
same version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moe_router.config import RouterSpec, ServiceConfig, router_error
from moe_router.errors import NotFoundError, RouterConfigurationError
from moe_router.loading.weights import load_router_weights
from moe_router.routing.base import RouterBase
from moe_router.routing.kinds import kind_entry

__all__ = [
    "HostedRouter",
    "resolve_device",
    "construct_router",
    "init_random_",
    "build_router",
    "load_routers",
    "warm_up",
]


@dataclass(frozen=True)
class HostedRouter:
    """One configured router, built once per MoE layer, ready to serve.

    layers: one router per layer (index = the request's layer), eval mode, no grad,
    on ``device``. versions: ``layers[i].version()``, computed once at load.
    """

    spec: RouterSpec
    layers: tuple[RouterBase, ...]
    versions: tuple[str, ...]
    device: torch.device

    def router(self, layer: int) -> RouterBase:
        """The router of ``layer``; NotFoundError naming the valid range otherwise."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not (
            0 <= layer < len(self.layers)
        ):
            raise NotFoundError(
                f"router {self.spec.name!r} serves layers 0..{len(self.layers) - 1}, "
                f"got layer {layer!r}"
            )
        return self.layers[layer]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda[:N]`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise RouterConfigurationError(
                f"server.device: {name!r} needs CUDA, but torch {torch.__version__} sees no "
                "CUDA device; use 'cpu' or 'auto'"
            )
        device = torch.device(name)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RouterConfigurationError(
                f"server.device: {name!r} does not exist; this host has cuda:0..cuda:{count - 1}"
            )
        return device
    raise RouterConfigurationError(
        f"server.device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}"
    )


def _source(spec: RouterSpec) -> str:
    return spec.source or f"router {spec.name!r}"


def construct_router(spec: RouterSpec) -> RouterBase:
    """Instantiate the class of ``spec.kind`` with the spec's arguments (weights untouched).

    The class's own checks run here; their errors come back prefixed with the spec's
    key path, e.g. ``config.yaml: routers[2].top_k: ...``. (Config validation runs the
    same construction on the meta device.)
    """
    entry = kind_entry(spec.kind)
    try:
        router: RouterBase = entry.construct(spec.router_config(), entry.arguments_from(spec))
    except RouterConfigurationError as exc:
        raise RouterConfigurationError(router_error(_source(spec), str(exc))) from None
    return router


def init_random_(router: nn.Module, seed: int) -> None:
    """Re-initialise every ``nn.Linear`` of ``router`` from ``seed``, as nn.Linear does.

    Kaiming-uniform weights (bound ``1/sqrt(fan_in)``, so logits have the usual scale)
    and uniform biases, drawn from a dedicated ``torch.Generator`` in module order.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in router.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                if module.bias is not None:
                    bound = 1.0 / math.sqrt(module.in_features)
                    module.bias.uniform_(-bound, bound, generator=generator)


def build_router(spec: RouterSpec, layer: int, device: torch.device) -> RouterBase:
    """Layer ``layer``'s router: constructed, weighted (random or checkpoint), on ``device``.

    Returned in eval mode with ``requires_grad`` off. Construction runs under a forked
    RNG seeded with ``seed + layer`` so any parameter the class draws itself is
    deterministic too.
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < spec.layers:
        raise RouterConfigurationError(
            f"{_source(spec)}.layers: layer {layer!r} is outside 0..{spec.layers - 1}"
        )
    seed = spec.weights.seed + layer
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        router = construct_router(spec)
    if spec.weights.path is None:
        init_random_(router, seed)
    else:
        try:
            load_router_weights(router, spec.weights, layer)
        except RouterConfigurationError as exc:
            raise RouterConfigurationError(f"{_source(spec)}.weights: {exc}") from None
    router.to(device)
    router.eval()
    router.requires_grad_(False)
    return router


def load_routers(config: ServiceConfig) -> dict[str, HostedRouter]:
    """Build every configured router, all layers, on ``config.server.device``."""
    device = resolve_device(config.server.device)
    hosted: dict[str, HostedRouter] = {}
    for spec in config.routers:
        layers = tuple(build_router(spec, layer, device) for layer in range(spec.layers))
        hosted[spec.name] = HostedRouter(
            spec=spec,
            layers=layers,
            versions=tuple(router.version() for router in layers),
            device=device,
        )
    return hosted


def warm_up(hosted: dict[str, HostedRouter]) -> None:
    """Route one small batch through every stateless layer before turning SERVING.

    The first pass through a kernel pays for its set-up (measured in-process here: 7.8 ms
    for the default mixtral's first 4-token call, 0.4 ms for the next); the warm-up
    keeps that off the first real callers. Stateful routers are skipped (a warm-up call
    would move their balancing state), and so are routers whose estimator needs inputs
    the warm-up has not got; statistics are reset afterwards.
    """
    with torch.inference_mode():
        for router in hosted.values():
            for layer in router.layers:
                if layer.stateful or layer.stochastic or layer.required_estimator_inputs:
                    continue  # (a call without its attention_weights would fail)
                sample = torch.zeros(16, layer.hidden_size, device=router.device)
                ids = {"input_ids": torch.zeros(16, dtype=torch.int64, device=router.device)}
                layer(sample, **(ids if layer.takes_input_ids else {}))
                layer.reset_stats()
