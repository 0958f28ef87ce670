"""Routers configured from a checkpoint directory answer as transformers' own routers do.

For every family in ``FAMILIES`` (each part): a tiny random model of that family is
saved with ``save_pretrained`` (the Hub layout), a config.yaml names only its
``model_dir``, and the served answers of every MoE layer, through the loaded router and
its serving chain, are compared with the transformers router module of that layer on
the same hidden states: the same set of experts per token (fp32, exactly) and the same
weights matched by expert id (within 1e-6, times the routed scaling factor). Where the
reference upcasts its input to fp32, bf16 hidden states are checked the same way.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_checkpoints import build_tiny_model, router_modules

from moe_router.chain.backend import RouteCall, RouteOptions
from moe_router.chain.hosted import build_chain
from moe_router.config import load_config
from moe_router.loading.checkpoint_families import FAMILIES
from moe_router.loading.registry import load_routers

pytest.importorskip("transformers")

TOKENS = 64

PARTS = [(model_type, part.name) for model_type, family in FAMILIES.items()
         for part in family.parts]

# More configurations of some families, where their defaults leave a path untested:
# id -> (model_type, part, text-config overrides, shift of every correction bias).
# A shift of -3 makes every biased sigmoid score negative: DeepSeek-V3's -inf fill still
# never picks a dropped group's expert. (The 0.0 fill then picks dropped experts that
# all tie at 0.0, where torch.topk's choice is unspecified; test_grouped.py checks our
# lower-index rule by hand.)
VARIANTS: dict[str, tuple[str, str, dict[str, Any], float]] = {
    "axk2-groups": ("axk2", "routed", {"n_group": 8, "topk_group": 4}, 0.0),
    "deepseek_v3-negative-bias": ("deepseek_v3", "routed", {}, -3.0),
    "mistral4-groups": ("mistral4", "routed", {"n_group": 8, "topk_group": 4}, 0.0),
    "glm4_moe-groups": ("glm4_moe", "routed", {"n_group": 8, "topk_group": 4}, 0.0),
    "deepseek_v2-greedy": ("deepseek_v2", "routed", {"topk_method": "greedy"}, 0.0),
    "qwen3_moe-renormalized": ("qwen3_moe", "routed", {"norm_topk_prob": True}, 0.0),
    "cohere2_moe-sigmoid": ("cohere2_moe", "routed",
                            {"expert_selection_fn": "sigmoid", "norm_topk_prob": True}, 0.0),
    "kolibri1-renormalized": ("kolibri1", "routed", {"norm_topk_prob": True}, 0.0),
    "lfm2_moe-no-expert-bias": ("lfm2_moe", "routed", {"use_expert_bias": False}, 0.0),
}
CASES = [(m, p, {}, 0.0) for m, p in PARTS] + list(VARIANTS.values())


def family_id(model_type: str, part: str) -> str:
    """The parametrised test id of a family's part: ``mixtral`` or ``deepseek_v4-hash``."""
    first = FAMILIES[model_type].parts[0].name
    return model_type if part == first else f"{model_type}-{part}"


CASE_IDS = [family_id(m, p) for m, p in PARTS] + list(VARIANTS)


# How to call each reference router: (module, block holding it, hidden [T, D], input_ids)
# -> (indices [T, k], weights [T, k]). Most return (logits, weights, indices).
Reference = Callable[[Any, Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _plain(module: Any, block: Any, x: torch.Tensor, ids: torch.Tensor) -> Any:
    out = module(x)
    return out[2], out[1]


def _with_block_bias(attr: str) -> Reference:
    def call(module: Any, block: Any, x: torch.Tensor, ids: torch.Tensor) -> Any:
        out = module(x if module.__class__.__name__ != "AfmoeTokenChoiceRouter" else x[None],
                     getattr(block, attr, None))
        return out[2], out[1]
    return call


def _llama4(module: Any, block: Any, x: torch.Tensor, ids: torch.Tensor) -> Any:
    scores, _ = module(x)
    weights, indices = torch.topk(scores, module.top_k, dim=-1)
    return indices, weights


def _dbrx(module: Any, block: Any, x: torch.Tensor, ids: torch.Tensor) -> Any:
    weights, indices = block.route_tokens_to_experts(module(x))
    return indices, weights


def _jetmoe(module: Any, block: Any, x: torch.Tensor, ids: torch.Tensor) -> Any:
    index_sorted, batch_index, batch_gates, expert_size, _ = module(x)
    experts = torch.repeat_interleave(torch.arange(len(expert_size)), torch.tensor(expert_size))
    k = module.top_k
    slot = index_sorted % k
    indices = torch.empty(x.shape[0], k, dtype=torch.long)
    weights = torch.empty(x.shape[0], k)
    indices[batch_index, slot] = experts
    weights[batch_index, slot] = batch_gates.float()
    return indices, weights


def _hash(module: Any, block: Any, x: torch.Tensor, ids: torch.Tensor) -> Any:
    out = module(x, ids)
    return out[2], out[1]


def _inkling(module: Any, block: Any, x: torch.Tensor, ids: torch.Tensor) -> Any:
    _, weights, indices, shared = module(x)
    shared_ids = torch.arange(module.num_experts, module.n_total_experts).expand(x.shape[0], -1)
    return torch.cat([indices, shared_ids], -1), torch.cat([weights, shared], -1)


REFERENCE_CALLS: dict[str, Reference] = {
    "afmoe": _with_block_bias("expert_bias"),
    "hy_v3": _with_block_bias("e_score_correction_bias"),
    "minimax_m2": _with_block_bias("e_score_correction_bias"),
    "lfm2_moe": _with_block_bias("expert_bias"),
    "llama4": _llama4,
    "dbrx": _dbrx,
    "jetmoe": _jetmoe,
    "deepseek_v4-hash": _hash,
    "inkling_mm_model": _inkling,
}


def _by_expert(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = indices.long().argsort(dim=-1)
    return indices.long().gather(-1, order), weights.float().gather(-1, order)


@pytest.fixture(scope="module")
def pool() -> Any:
    with ThreadPoolExecutor(2) as executor:
        yield executor


def _serve(model_dir: Path, part: str, tmp_path: Path, pool: Any) -> Any:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        "server: {device: cpu}\n"
        f"routers:\n  - {{name: parity, model_dir: '{model_dir}', model_part: {part},\n"
        "     batching: {enabled: false}}\n"
    )
    config = load_config(config_file, env={})
    hosted = load_routers(config)["parity"]
    return hosted, build_chain(hosted, config, pool, None)


def _route(chain: Any, layer: int, x: torch.Tensor, ids: torch.Tensor | None) -> Any:
    call = RouteCall("parity", layer, x, RouteOptions(skip_cache=True, input_ids=ids))
    return asyncio.run(chain.chain.route(call)).output


@pytest.mark.parametrize(("model_type", "part", "overrides", "bias_shift"), CASES,
                         ids=CASE_IDS)
def test_checkpoint_router_matches_transformers(
    model_type: str, part: str, overrides: dict[str, Any], bias_shift: float, tmp_path: Path,
    pool: Any,
) -> None:
    key = family_id(model_type, part)
    reference_class = next(p for p in FAMILIES[model_type].parts if p.name == part).reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_tiny_model(model_type, overrides=overrides)
        if bias_shift:
            _shift_correction_biases(model, bias_shift)
        model.save_pretrained(tmp_path / "model")
    hosted, chain = _serve(tmp_path / "model", part, tmp_path, pool)
    spec = hosted.spec
    layers = (list(spec.weights.checkpoint_layers) if spec.weights.checkpoint_layers
              else [spec.weights.layer_offset + i for i in range(spec.layers)])
    modules = router_modules(model, reference_class.split()[0])
    assert set(layers) <= set(modules), (layers, sorted(modules))
    call_reference = REFERENCE_CALLS.get(key, REFERENCE_CALLS.get(model_type, _plain))
    scale = max(1.0, abs(spec.routed_scaling_factor))
    gen = torch.Generator().manual_seed(7)
    for ours, at in enumerate(layers):
        module = modules[at]
        block = model.get_submodule(_parent_name(model, module))
        x = torch.randn(TOKENS, spec.input_dim, generator=gen)
        ids = torch.randint(0, spec.vocab_size or 1, (TOKENS,), generator=gen)
        with torch.no_grad():
            ref_indices, ref_weights = call_reference(module, block, x, ids)
        out = _route(chain, ours, x, ids if hosted.layers[0].takes_input_ids else None)
        k = ref_indices.shape[-1]
        assert out.expert_indices.shape[-1] == k, (out.expert_indices.shape, k)
        got_i, got_w = _by_expert(out.expert_indices, out.expert_weights)
        want_i, want_w = _by_expert(ref_indices, ref_weights)
        torch.testing.assert_close(got_i, want_i, rtol=0, atol=0,
                                   msg=f"layer {at}: other experts")
        torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-6 * scale,
                                   msg=f"layer {at}: other weights")
        _check_bf16(chain, ours, module, block, x, ids, call_reference, hosted, scale)


def _check_bf16(chain: Any, ours: int, module: Any, block: Any, x: torch.Tensor,
                ids: torch.Tensor, call_reference: Reference, hosted: Any, scale: float) -> None:
    """bf16 hidden states, where the reference upcasts them (fp32 gate): the same answer."""
    x16 = x.bfloat16()
    try:
        with torch.no_grad():
            ref_indices, ref_weights = call_reference(module, block, x16, ids)
    except RuntimeError:  # F.linear(bf16, fp32): this reference does not upcast
        return
    out = _route(chain, ours, x16, ids if hosted.layers[0].takes_input_ids else None)
    got_i, got_w = _by_expert(out.expert_indices, out.expert_weights)
    want_i, want_w = _by_expert(ref_indices, ref_weights)
    torch.testing.assert_close(got_i, want_i, rtol=0, atol=0, msg="bf16: other experts")
    if ref_weights.dtype == torch.float32:
        torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-6 * scale, msg="bf16: weights")
    else:  # the reference rounds its fp32 weights to the input dtype: one bf16 step
        torch.testing.assert_close(got_w, want_w, rtol=2**-8, atol=1e-6 * scale,
                                   msg="bf16: weights (rounded by the reference)")


def _shift_correction_biases(model: torch.nn.Module, shift: float) -> None:
    with torch.no_grad():
        for name, tensor in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                tensor.add_(shift)


def _parent_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[0]
    raise AssertionError("router module not in the model")
