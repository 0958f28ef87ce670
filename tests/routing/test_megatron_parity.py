"""Our top-k routers, token dropping and aux loss against Megatron-core 0.19.2.

Two references: ``megatron_moe_reference`` (tests/support: a port of the Megatron
functions, always run) and megatron-core itself where it is installed (it cannot be a
dependency: it needs Python >= 3.12 and imports triton; see that module). The port is
checked against megatron-core on the same inputs whenever both are present.

Comparisons are on [T, E] routing maps (Megatron's top-k is unsorted), on random gates
and inputs of the shapes the issue names: Mixtral-like (E=8, k=2, 512 tokens, factor
1.0), Qwen-like without renormalisation (E=16, k=4, 128 tokens), DeepSeek-V3-like
(E=256, k=8, 8 groups keep 4, sigmoid + correction bias, x2.5, 256 tokens, factor 1.25).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import megatron_moe_reference as port
import pytest
import torch

from moe_router.routing import GroupedTopKRouter, RouterConfig, TopKRouter
from moe_router.routing.router_config import GroupScore, ScoringFunction


def _import_megatron() -> ModuleType | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.transformer.moe import moe_utils
    except ImportError:
        return None
    return moe_utils


MEGATRON = _import_megatron()
_NO_MEGATRON = (
    "megatron-core 0.19.2 is not installed (Requires-Python >= 3.12 and triton; "
    "pip install --ignore-requires-python megatron-core==0.19.2 triton)"
)
REFERENCES = [
    pytest.param(port, id="port"),
    pytest.param(MEGATRON, id="megatron-core",
                 marks=pytest.mark.skipif(MEGATRON is None, reason=_NO_MEGATRON)),
]


@dataclass(frozen=True)
class Case:
    """One model shape: our RouterConfig fields and the matching Megatron arguments."""

    name: str
    tokens: int
    capacity_factor: float
    config: dict[str, Any]
    megatron: dict[str, Any]
    grouped: bool = False
    bias: bool = False
    hidden: int = 64
    extra: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("mixtral", 512, 1.0,
         dict(num_experts=8, top_k=2, renormalize=True),
         dict(score_function="softmax", use_pre_softmax=False)),
    Case("qwen_no_renorm", 128, 1.0,
         dict(num_experts=16, top_k=4, renormalize=False),
         dict(score_function="softmax", use_pre_softmax=True)),
    Case("deepseek_v3", 256, 1.25,
         dict(num_experts=256, top_k=8, n_group=8, topk_group=4,
              group_score=GroupScore.TOP2_SUM, scoring=ScoringFunction.SIGMOID,
              renormalize=True, routed_scaling_factor=2.5),
         dict(score_function="sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5),
         grouped=True, bias=True),
]


def _router(case: Case, seed: int, **capacity: Any) -> TopKRouter:
    config = RouterConfig(hidden_size=case.hidden, **case.config, **capacity)
    router: TopKRouter
    if case.grouped:
        router = GroupedTopKRouter(config, use_correction_bias=case.bias)
    else:
        router = TopKRouter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(router.gate.weight.shape, generator=gen) * 0.2)
        if case.bias:
            router.e_score_correction_bias.copy_(
                torch.randn(case.config["num_experts"], generator=gen) * 0.05)
    return router.eval()


def _inputs(case: Case, seed: int) -> torch.Tensor:
    return torch.randn(case.tokens, case.hidden, generator=torch.Generator().manual_seed(seed))


def _dense(out: Any, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our token-centric answer as Megatron's (probs [T, E], map [T, E] bool)."""
    indices = out.expert_indices.reshape(-1, out.expert_indices.shape[-1]).long()
    weights = out.expert_weights.reshape(indices.shape)
    valid = indices >= 0
    column = torch.where(valid, indices, num_experts)
    probs = torch.zeros(indices.shape[0], num_experts + 1).scatter(1, column, weights)
    routing_map = torch.zeros(indices.shape[0], num_experts + 1, dtype=torch.bool)
    routing_map.scatter_(1, column, valid)
    return probs[:, :num_experts], routing_map[:, :num_experts]


def _megatron_answer(ref: ModuleType, case: Case, router: TopKRouter, logits: torch.Tensor,
                     pad_to_capacity: bool = False) -> dict[str, torch.Tensor]:
    k, num_experts = case.config["top_k"], case.config["num_experts"]
    bias = router.e_score_correction_bias if case.bias else None
    probs, routing_map = ref.topk_routing_with_score_function(
        logits, k, expert_bias=bias, **case.megatron)
    final_probs, final_map = ref.apply_router_token_dropping(
        probs, routing_map, router_topk=k, capacity_factor=case.capacity_factor,
        drop_policy="probs", pad_to_capacity=pad_to_capacity)
    aux_map, aux_scores = ref.compute_routing_scores_for_aux_loss(
        logits, k, case.megatron["score_function"])
    aux_loss = ref.switch_load_balancing_loss_func(
        aux_scores, aux_map.sum(dim=0), logits.shape[0], k, num_experts, 1.0)
    return dict(probs=probs, map=routing_map, final_probs=final_probs, final_map=final_map,
                aux_loss=aux_loss)


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_dropping_and_aux_loss_equal_megatrons(reference, case: Case, seed: int):
    num_experts = case.config["num_experts"]
    free = _router(case, seed)
    dropping = _router(case, seed, capacity_factor=case.capacity_factor)
    x = _inputs(case, seed)
    with torch.no_grad():
        ours_free, ours = free(x, return_losses=True), dropping(x, return_losses=True)
    # The plain router may route through the fused CPU op (its own matmul): the same
    # logits to float32 rounding; each answer is judged on its own logits.
    torch.testing.assert_close(ours.router_logits, ours_free.router_logits, rtol=0, atol=1e-5)
    want = _megatron_answer(reference, case, free, ours.router_logits)
    want_free = _megatron_answer(reference, case, free, ours_free.router_logits)

    probs, routing_map = _dense(ours_free, num_experts)
    assert int((routing_map != want_free["map"]).sum()) == 0
    torch.testing.assert_close(probs, want_free["probs"], rtol=0, atol=1e-6)

    kept_probs, kept_map = _dense(ours, num_experts)
    assert int(want["map"].sum() - want["final_map"].sum()) > 0, "the case must drop"
    assert int((kept_map != want["final_map"]).sum()) == 0  # zero differing assignments
    torch.testing.assert_close(kept_probs, want["final_probs"], rtol=0, atol=1e-6)
    assert ours.dropped_tokens == int(want["map"].sum() - want["final_map"].sum())
    assert ours.tokens_per_expert.tolist() == want["final_map"].sum(dim=0).tolist()

    for out, wanted in ((ours, want), (ours_free, want_free)):
        assert abs(float(out.aux_loss) - float(wanted["aux_loss"])) <= 1e-6


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pad_to_capacity_lists_the_tokens_megatron_keeps(reference, case: Case):
    num_experts, k = case.config["num_experts"], case.config["top_k"]
    router = _router(case, 7, capacity_factor=case.capacity_factor, pad_to_capacity=True)
    with torch.no_grad():
        out = router(_inputs(case, 7))
    want = _megatron_answer(reference, case, router, out.router_logits, pad_to_capacity=True)
    capacity = port.get_capacity(case.tokens * k, num_experts, case.capacity_factor)
    # Megatron pads each expert to exactly C rows (with unrouted tokens at weight 0);
    # we list the same routed tokens in [E, C] and mark the padding -1.
    assert want["final_map"].sum(dim=0).tolist() == [capacity] * num_experts
    assert tuple(out.expert_tokens.shape) == (num_experts, capacity)
    routed = want["final_map"] & want["map"]
    for expert in range(num_experts):
        listed = out.expert_tokens[expert]
        tokens = listed[listed >= 0].tolist()
        assert tokens == routed[:, expert].nonzero().flatten().tolist()  # token order
        torch.testing.assert_close(out.expert_token_weights[expert, : len(tokens)],
                                   want["final_probs"][tokens, expert], rtol=0, atol=1e-6)
        assert torch.all(out.expert_token_weights[expert, len(tokens):] == 0)


# ----------------------------------------------------------------- the port itself
def test_port_keeps_the_issue_minimal_case_as_megatrons_formulas_say():
    """Hand-checked: final weights [[.667, .333], [.517, .483]] on experts 0 and 1,
    capacity ceil(2*2/4*1.0) = 1: expert 0 keeps token 0, expert 1 keeps token 1."""
    logits = torch.tensor([[0.6, 0.3, 0.05, 0.05], [0.30, 0.28, 0.21, 0.21]]).log()
    probs, routing_map = port.topk_routing_with_score_function(logits, 2)
    torch.testing.assert_close(probs[:, :2], torch.tensor([[2 / 3, 1 / 3], [0.3 / 0.58,
                                                                            0.28 / 0.58]]))
    _, kept = port.apply_router_token_dropping(probs, routing_map, 2, 1.0)
    assert kept.int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]
    aux_map, scores = port.compute_routing_scores_for_aux_loss(logits, 2, "softmax")
    loss = port.switch_load_balancing_loss_func(scores, aux_map.sum(0), 2, 2, 4, 1.0)
    # sum_t p = [.9, .58, .26, .26], counts [2, 2, 0, 0]: (1.8 + 1.16) * 4 / (2 * 4) = 1.48
    assert float(loss) == pytest.approx(1.48)


@pytest.mark.skipif(MEGATRON is None, reason=_NO_MEGATRON)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_port_equals_megatron_core(case: Case):
    router = _router(case, 11)
    logits = router(_inputs(case, 11)).router_logits.detach()
    for pad in (False, True):
        ours = _megatron_answer(port, case, router, logits, pad_to_capacity=pad)
        theirs = _megatron_answer(MEGATRON, case, router, logits, pad_to_capacity=pad)
        for key in ("map", "final_map"):
            assert torch.equal(ours[key], theirs[key]), key
        for key in ("probs", "final_probs", "aux_loss"):
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    assert MEGATRON.get_capacity(case.tokens * case.config["top_k"], case.config["num_experts"],
                                 case.capacity_factor) == port.get_capacity(
        case.tokens * case.config["top_k"], case.config["num_experts"], case.capacity_factor)
