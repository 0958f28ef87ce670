"""The Open Inference Protocol's view of the hosted routers: model names, and each
model's inputs and outputs as ModelMetadata describes them.

Each hosted router is a model. Its MoE layer is a request parameter, or part of the
name (``mixtral/3``) for clients that can name a model but not set parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from moe_router.chain.hosted import HostedRouterChain
from moe_router.config.schema import RouterKind
from moe_router.errors import NotFoundError, ValidationError
from moe_router_client.inference import grpc_service_pb2 as oip

__all__ = ["ModelRef", "model_metadata", "model_outputs", "resolve_model"]

_METADATA = oip.ModelMetadataResponse.TensorMetadata


@dataclass(frozen=True)
class ModelRef:
    """A model name resolved: the router, and the layer when the name carries one."""

    router: str
    layer: int | None = None


def resolve_model(name: str, chains: Mapping[str, HostedRouterChain]) -> ModelRef:
    """``mixtral`` -> (mixtral, None); ``mixtral/3`` -> (mixtral, 3); NotFoundError else."""
    if name in chains:
        return ModelRef(name)
    router, sep, layer = name.rpartition("/")
    if sep and router in chains and layer.isdigit():
        count = len(chains[router].hosted.layers)
        if int(layer) >= count:
            raise NotFoundError(
                f"model '{name}': router '{router}' has no layer {layer}; expected "
                f"{router}/0 .. {router}/{count - 1}"
            )
        return ModelRef(router, int(layer))
    if not name:
        raise ValidationError(f"model name: required; this server hosts {sorted(chains)}")
    raise NotFoundError(
        f"unknown model '{name[:200]}'; this server hosts {sorted(chains)} "
        "(a layer of one as 'name/layer')"
    )


def model_outputs(chain: HostedRouterChain) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every output of a router, in ModelMetadata's order."""
    layer = chain.hosted.layers[0]
    low, high = layer.k_range
    width = high if low == high else -1
    experts = layer.num_experts
    outputs = [
        ("expert_indices", "INT32", [-1, width]),
        ("expert_weights", "FP32", [-1, width]),
        ("num_experts_per_token", "INT32", [-1]),
        ("router_logits", "FP32", [-1, experts]),
        ("tokens_per_expert", "INT64", [experts]),
    ]
    if layer.accepts_estimator_inputs:  # the dynamic routers
        outputs.append(("complexity_scores", "FP32", [-1]))
    if chain.hosted.spec.kind is RouterKind.SOFT_MOE:
        slots = experts * chain.hosted.spec.slots_per_expert
        outputs += [("dispatch_weights", "FP32", [-1, slots]),
                    ("combine_weights", "FP32", [-1, slots])]
    return outputs


def model_metadata(name: str, ref: ModelRef, chain: HostedRouterChain) -> oip.ModelMetadataResponse:
    """Inputs and outputs of a model with their shapes, -1 where a call decides."""
    layer = chain.hosted.layers[0]
    inputs = [_METADATA(name="hidden_states", datatype="FP32", shape=[-1, layer.hidden_size])]
    if layer.accepts_estimator_inputs:
        inputs += [
            _METADATA(name="attention_weights", datatype="FP32", shape=[-1, -1, -1, -1]),
            _METADATA(name="logits", datatype="FP32", shape=[-1, -1, -1]),
            _METADATA(name="gradients", datatype="FP32", shape=[-1, layer.hidden_size]),
        ]
    if layer.takes_input_ids:
        inputs.append(_METADATA(name="input_ids", datatype="INT64", shape=[-1]))
    versions = chain.hosted.versions
    return oip.ModelMetadataResponse(
        name=name,
        versions=[versions[ref.layer]] if ref.layer is not None else list(dict.fromkeys(versions)),
        platform=f"moe-router/{chain.hosted.spec.kind.value}",
        inputs=inputs,
        outputs=[_METADATA(name=n, datatype=d, shape=s) for n, d, s in model_outputs(chain)],
    )
