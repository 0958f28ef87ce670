"""TopKRouter: the per-token top-k gate (Mixtral, Qwen-MoE, OLMoE, MiniMax-M2, Gemma 4, ...)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from moe_router.errors import RouterConfigurationError
from moe_router.routing import functional as F
from moe_router.routing import fused_topk, scoring
from moe_router.routing.base import RouterBase
from moe_router.routing.output import RouterOutput, Selection
from moe_router.routing.router_config import (
    AuxLossAssignments,
    CorrectionBiasTarget,
    GroupMaskFill,
    GroupScore,
    InputNorm,
    RouterConfig,
    ScoringFunction,
)

__all__ = ["TopKRouter"]


class TopKRouter(RouterBase):
    """Score every expert, keep the k best per token.

    Shapes: T tokens, E experts (E_r routed, S = ``scored_shared_experts``), k = top_k.

        logits  = gate(x), with the base's input norm / multiplier / soft cap   [T, E]
        scores  = softmax | sigmoid | sqrtsoftplus (logits)                      [T, E]
        choice  = scores[:, :E_r] (+ e_score_correction_bias)  (bias on ``scores``)
                | logits[:, :E_r] + e_score_correction_bias     (bias on ``logits``)
        choice  = :meth:`restrict_choice` (choice)      (groups: GroupedTopKRouter)
        indices = topk(choice, k)                       [T, k]  (ties -> lower index)
        weights = scores[indices]  (the bias steers selection only)
        weights /= sum(weights) + renormalize_eps       if renormalize
                   (with S shared experts: k + S slots, their scores in the sum too)
        weights *= per_expert_scale[indices]            (Gemma 4)
        weights *= routed_scaling_factor  (* weight_scale, Inkling's global_scale)

    Mixtral is softmax + renormalize; Qwen2/3-MoE and OLMoE softmax with
    norm_topk_prob as configured; routers that take the top-k of the logits and softmax
    only those (GPT-OSS, Granite, JetMoE) are softmax + renormalize, the same numbers.
    ``use_correction_bias`` adds the ``e_score_correction_bias`` [E_r] buffer
    (DeepSeek-V3's ``noaux_tc`` without groups: Ernie 4.5, MiniMax-M2, HunYuan-V3).

    Inference on a CPU runs through compiled ops (:mod:`~moe_router.routing.fused_topk`)
    when the host can build them: the whole route of the plain softmax top-k (no bias,
    groups, shared experts, logit or input transforms, learned scales or dropping:
    Mixtral, Qwen-MoE, OLMoE) as one op, and the selection of the other softmax or
    sigmoid configurations without shared experts, learned scales or dropping as another
    (the gate stays the batch-invariant matmul).
    """

    fixed_k = True
    values_judged_by_logits = True
    _fuses_selection: ClassVar[bool] = True  # see __init__

    e_score_correction_bias: torch.Tensor  # [E_r] fp32, only when use_correction_bias

    def __init__(self, config: RouterConfig, use_correction_bias: bool = False) -> None:
        if not isinstance(use_correction_bias, bool):
            raise RouterConfigurationError(
                f"use_correction_bias: must be True or False, got {use_correction_bias!r}"
            )
        if (config.correction_bias_target is CorrectionBiasTarget.LOGITS
                and not use_correction_bias):
            raise RouterConfigurationError(
                "correction_bias_target: 'logits' places the e_score_correction_bias; it "
                "needs use_correction_bias: true"
            )
        super().__init__(config)
        self.use_correction_bias = use_correction_bias
        # A softmax top-k chosen on the scores sums to at least its top-1 score, about
        # 1/E: at least 2^-(c + 1) with c = ceil(log2 E) (a binade of margin for
        # rounding), whose float32 half-ulp is at least 2^-(c + 25). An eps below
        # 2^-(c + 26) rounds away (s + eps is s), so the addition is skipped: one op
        # less (Mixtral's 1e-20 against 2^-29 for E = 8).
        self._eps_vanishes = (
            config.scoring is ScoringFunction.SOFTMAX
            and config.routed_experts == config.num_experts
            and config.renormalize_eps < 2.0 ** -(math.ceil(math.log2(config.num_experts)) + 26)
        )
        # Inference on a CPU through the fused ops (fused_topk): the selection of the
        # classes that say so in their own body (a subclass that changes it never fuses) ...
        self._selection_fusable = (
            type(self).__dict__.get("_fuses_selection", False)
            and config.scoring in (ScoringFunction.SOFTMAX, ScoringFunction.SIGMOID)
            and config.routed_experts == config.num_experts
            and config.n_group <= 64
            and not (config.per_expert_scale or config.learned_weight_scale)
            and not config.drops_tokens
        )
        # ... and for the plain softmax top-k the whole route, gate matmul included.
        self._fusable = (
            self._selection_fusable
            and type(self) is TopKRouter
            and not use_correction_bias
            and config.scoring is ScoringFunction.SOFTMAX
            and config.top_k < config.num_experts
            and not config.gate_bias
            and config.input_norm is InputNorm.NONE
            and config.logit_multiplier == 1.0
            and config.logit_softcap is None
        )
        if use_correction_bias:
            self.register_buffer(
                "e_score_correction_bias",
                torch.zeros(config.routed_experts, dtype=torch.float32),
            )

    def route_validated(
        self,
        flat: torch.Tensor,
        lead: tuple[int, ...],
        generator: torch.Generator | None = None,
        return_losses: bool | None = None,
        **kwargs: Any,
    ) -> RouterOutput:
        """:meth:`RouterBase.route_validated`, through the fused CPU op when it applies."""
        weight = self._fused_gate(flat)
        if weight is not None:
            return self._route_fused(flat, lead, weight, self._wants_losses(return_losses))
        return super().route_validated(
            flat, lead, generator=generator, return_losses=return_losses, **kwargs
        )

    def route_many_validated(
        self,
        flats: Sequence[torch.Tensor],
        leads: Sequence[tuple[int, ...]],
        generator: torch.Generator | None = None,
        return_losses: Sequence[bool] | bool | None = None,
    ) -> list[RouterOutput]:
        """:meth:`RouterBase.route_many_validated`; with the fused op each call is its own
        op call, the very one routing it alone makes (the op's rows are independent)."""
        weight = self._fused_gate(flats[0]) if flats else None
        if weight is not None:
            if return_losses is None or isinstance(return_losses, bool):
                wants = [self._wants_losses(return_losses)] * len(flats)
            else:
                wants = [self._wants_losses(w) for w in return_losses]
            return [self._route_fused(f, lead, weight, want)
                    for f, lead, want in zip(flats, leads, wants, strict=True)]
        return super().route_many_validated(
            flats, leads, generator=generator, return_losses=return_losses
        )

    def _fused_gate(self, flat: torch.Tensor) -> torch.Tensor | None:
        """The gate weight [E, D] when this call goes through the fused op, else None: a
        plain softmax top-k (``_fusable``), inference without autograd, input and fp32
        gate on the CPU, and the op built on this host."""
        if not self._fusable or self.training or torch.is_grad_enabled():
            return None
        # The dicts nn.Module's __getattr__ would search (1 us a call through it).
        weight = self._modules["gate"]._parameters["weight"]  # type: ignore[union-attr]
        if (flat.is_cpu and weight.is_cpu and weight.dtype == torch.float32  # type: ignore[union-attr]
                and fused_topk.kernel_available()):
            return weight
        return None

    def _route_fused(
        self, flat: torch.Tensor, lead: tuple[int, ...], weight: torch.Tensor, losses: bool
    ) -> RouterOutput:
        """Route flat [T, D] with the fused op and gate ``weight`` (:meth:`_fused_gate`);
        the losses, counts and statistics as :meth:`RouterBase._finish` makes them."""
        cfg = self.config
        eps = 0.0 if self._eps_vanishes else cfg.renormalize_eps
        # The op adds the counts into the running expert load (a CPU router's buffer).
        route = fused_topk.topk_softmax_route(
            flat, weight, cfg.top_k, cfg.renormalize, eps, cfg.routed_scaling_factor,
            want_probs=losses, load=self._buffers["expert_load"],
        )
        indices, weights, per_token, logits = (
            route.indices, route.weights, route.num_per_token, route.logits)
        aux_loss = z_loss = None
        if route.probs is not None:  # asked for with the losses
            aux_loss = F.aux_loss_from_counts(route.probs, route.counts, cfg.top_k)
            z_loss = self.compute_z_loss(logits)
        self.update_stats(route.counts, per_token, 0, indices.numel(), load_added=True)
        if len(lead) > 1:  # [B, S, ...]
            indices = indices.reshape(*lead, cfg.top_k)
            weights = weights.reshape(*lead, cfg.top_k)
            per_token = per_token.reshape(lead)
            logits = logits.reshape(*lead, cfg.num_experts)
        return RouterOutput(
            expert_indices=indices,
            expert_weights=weights,
            num_experts_per_token=per_token,
            router_logits=logits,
            tokens_per_expert=route.counts,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits_bounded=route.logits_bounded,
        )

    @property
    def k_range(self) -> tuple[int, int]:
        """(k + S, k + S): the routed experts and the scored shared ones."""
        k = self.config.top_k + self.config.scored_shared_experts
        return (k, k)

    def restrict_choice(self, choice: torch.Tensor) -> torch.Tensor:
        """Hook before the top-k: choice [T, E_r] -> [T, E_r]; all experts stay here."""
        return choice

    def select(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        /,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Selection:
        """Top-k of flat logits [T, E]; indices/weights [T, k(+S)], probs [T, E]."""
        cfg = self.config
        if (self._selection_fusable and not self.training and not torch.is_grad_enabled()
                and logits.is_cpu and fused_topk.kernel_available()):
            bias = self.e_score_correction_bias if self.use_correction_bias else None
            if bias is None or (bias.dtype == torch.float32 and bias.is_cpu):
                return self._select_fused(logits, bias)
        routed = cfg.routed_experts
        scores = F.score(logits, cfg.scoring)
        choice = scores[:, :routed] if routed < cfg.num_experts else scores
        if self.use_correction_bias:
            bias = self.e_score_correction_bias  # an fp32 buffer
            if cfg.correction_bias_target is CorrectionBiasTarget.LOGITS:
                choice = logits[:, :routed].float() + bias
            else:
                choice = choice + bias
        restricted = self.restrict_choice(choice)
        top_values, indices = F.topk_lowest_index(restricted, cfg.top_k)
        # Selected on the scores themselves: the top-k values are the weights (no gather).
        chosen = top_values if restricted is scores else None
        eps = cfg.renormalize_eps
        if chosen is not None and self._eps_vanishes:
            eps = 0.0
        indices, weights = scoring.combine_weights(
            scores, indices, routed_experts=routed, renormalize=cfg.renormalize,
            eps=eps, chosen=chosen,
        )
        if cfg.per_expert_scale:
            weights = weights * self.per_expert_scale.float()[indices]
        if cfg.routed_scaling_factor != 1.0:  # w * 1.0 is w
            weights = weights * cfg.routed_scaling_factor
        if cfg.learned_weight_scale:
            weights = weights * self.weight_scale.float()
        if cfg.scoring is ScoringFunction.SOFTMAX:
            return Selection(indices, weights, scores, {})
        return Selection(indices, weights, lambda: F.renormalize(scores), {})

    def _select_fused(self, logits: torch.Tensor, bias: torch.Tensor | None) -> Selection:
        """:meth:`select` as one op (:func:`fused_topk.topk_select`), counts included."""
        cfg = self.config
        grouped = type(self).restrict_choice is not TopKRouter.restrict_choice
        chosen_on_scores = bias is None and not grouped  # as select(): eps may vanish
        selection = fused_topk.topk_select(
            logits if logits.is_contiguous() else logits.contiguous(),
            None if bias is None else bias.contiguous(),
            cfg.top_k,
            sigmoid=cfg.scoring is ScoringFunction.SIGMOID,
            bias_on_logits=cfg.correction_bias_target is CorrectionBiasTarget.LOGITS,
            groups=cfg.n_group if grouped else 1,
            kept_groups=cfg.topk_group if grouped else 1,
            top2_sum=cfg.group_score is GroupScore.TOP2_SUM,
            fill_zero=cfg.group_mask_fill is GroupMaskFill.ZERO,
            renormalize=cfg.renormalize,
            eps=0.0 if chosen_on_scores and self._eps_vanishes else cfg.renormalize_eps,
            scale=cfg.routed_scaling_factor,
        )
        scores = selection.scores
        probs = scores if cfg.scoring is ScoringFunction.SOFTMAX else (
            lambda: F.renormalize(scores))
        return Selection(selection.indices, selection.weights, probs, {}, selection.counts,
                         selection.logits_bounded)

    def aux_loss_counts(self, selection: Selection) -> torch.Tensor | None:
        """Megatron's plain top-k of the probabilities [T, E] over all experts (ties to
        the lower index), counted per expert [E]; None (the selection itself) under
        ``aux_loss_assignments: selected`` or when neither groups nor a correction bias
        steer the selection away from the probabilities."""
        cfg = self.config
        plain = cfg.n_group == 1 and not self.use_correction_bias
        if plain or cfg.aux_loss_assignments is AuxLossAssignments.SELECTED:
            return None
        return F.top_k_mask(selection.probs, cfg.top_k).sum(dim=0)
