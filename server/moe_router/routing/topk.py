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
from moe_router.routing.output import LOGIT_BOUND, RouterOutput, Selection
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
    when the host can build them, for softmax or sigmoid scores with or without a
    correction bias and expert groups (no shared experts, learned scales or dropping):
    the whole route as one op where the gate is a plain linear layer (no input norm or
    logit transform: Mixtral, Qwen-MoE, OLMoE, GPT-OSS, DeepSeek-V3's few-token calls) and the
    call's size suits the op's matmul (:func:`~moe_router.routing.fused_topk.routes_call`),
    else the batch-invariant matmul and the selection as another op.
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
        # ... and the whole route, gate matmul included, where the gate is a plain linear
        # layer.
        self._fusable = (
            self._selection_fusable
            and config.input_norm is InputNorm.NONE
            and config.logit_multiplier == 1.0
            and config.logit_softcap is None
        )
        # Chosen on the scores themselves (no bias, no groups): as select(), eps may vanish.
        grouped = type(self).restrict_choice is not TopKRouter.restrict_choice
        self._selection_spec = fused_topk.SelectionSpec(
            sigmoid=config.scoring is ScoringFunction.SIGMOID,
            bias_on_logits=config.correction_bias_target is CorrectionBiasTarget.LOGITS,
            groups=config.n_group if grouped else 1,
            kept_groups=config.topk_group if grouped else 1,
            top2_sum=config.group_score is GroupScore.TOP2_SUM,
            fill_zero=config.group_mask_fill is GroupMaskFill.ZERO,
            renormalize=config.renormalize,
            eps=0.0 if (not use_correction_bias and not grouped and self._eps_vanishes)
            else config.renormalize_eps,
            scale=config.routed_scaling_factor,
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
        """:meth:`RouterBase.route_many_validated`. The calls the fused op routes
        (:meth:`_fused_gate`, each by its own size) without losses share one op call: its
        rows are independent of their batch mates, so each call's answer is the one
        routing it alone gives, and the gate is read once rather than once per call. Those
        asking for losses take an op call each; the others share the merged matmul."""
        if return_losses is None or isinstance(return_losses, bool):
            asked: Sequence[bool | None] = [return_losses] * len(flats)
        else:
            asked = return_losses
        gates = [self._fused_gate(f) for f in flats]
        wants = [self._wants_losses(want) for want in asked]
        rest = [i for i, gate in enumerate(gates) if gate is None]
        outputs: list[RouterOutput | None] = [None] * len(flats)
        shared = self._stackable([i for i, gate in enumerate(gates)
                                  if gate is not None and not wants[i]], flats)
        weight = gates[shared[0]] if shared else None
        if len(shared) > 1 and weight is not None:
            together = self._route_fused_together(
                [flats[i] for i in shared], [leads[i] for i in shared], weight)
            for i, output in zip(shared, together, strict=True):
                outputs[i] = output
        for i, gate in enumerate(gates):
            if gate is not None and outputs[i] is None:
                outputs[i] = self._route_fused(flats[i], leads[i], gate, wants[i])
        if rest:
            merged = super().route_many_validated(
                [flats[i] for i in rest], [leads[i] for i in rest], generator=generator,
                return_losses=[self._wants_losses(asked[i]) for i in rest],
            )
            for i, output in zip(rest, merged, strict=True):
                outputs[i] = output
        return outputs  # type: ignore[return-value]  # every slot is filled

    def _fused_gate(self, flat: torch.Tensor) -> torch.Tensor | None:
        """The gate weight [E, D] when this call goes through the fused route
        (:func:`fused_topk.topk_route`), else None: a fusable router (``_fusable``),
        inference without autograd, input, fp32 gate and bias on the CPU, a call size the
        op's matmul serves well and the op built on this host (:func:`fused_topk.routes_call`)."""
        if not self._fusable or self.training or torch.is_grad_enabled():
            return None
        # The dicts nn.Module's __getattr__ would search (1 us a call through it).
        parameters = self._modules["gate"]._parameters  # type: ignore[union-attr]
        weight, gate_bias = parameters["weight"], parameters["bias"]
        if not (flat.is_cpu and weight.is_cpu and weight.dtype == torch.float32  # type: ignore[union-attr]
                and (gate_bias is None or gate_bias.dtype == torch.float32)
                and self._fusable_bias()
                and fused_topk.routes_call(flat.shape[0], weight)):  # type: ignore[arg-type]
            return None
        return weight

    def _fusable_bias(self) -> bool:
        """Whether the correction bias (if any) is one the fused ops read: fp32, on the CPU."""
        if not self.use_correction_bias:
            return True
        bias = self._buffers["e_score_correction_bias"]
        return bias.dtype == torch.float32 and bias.is_cpu  # type: ignore[union-attr]

    def _route_fused(
        self, flat: torch.Tensor, lead: tuple[int, ...], weight: torch.Tensor, losses: bool
    ) -> RouterOutput:
        """Route flat [T, D] with the fused op and gate ``weight`` (:meth:`_fused_gate`);
        the losses, counts and statistics as :meth:`RouterBase._finish` makes them."""
        route = self._fused_op(flat, weight, losses)
        indices, weights, per_token, logits = (
            route.indices, route.weights, route.num_per_token, route.logits)
        aux_loss = z_loss = None
        if route.scores is not None:  # asked for with the losses
            aux_loss = self._aux_loss(self._fused_selection(route), route.counts)
            z_loss = self.compute_z_loss(logits)
        self.update_stats(route.counts, per_token, 0, indices.numel(), load_added=True)
        return self._fused_output(lead, indices, weights, per_token, logits, route.counts,
                                  route.logits_bounded, aux_loss, z_loss)

    def _fused_op(self, x: torch.Tensor, weight: torch.Tensor,
                  losses: bool) -> fused_topk.FusedRoute:
        """The fused op over x [T, D] with this router's gate bias, correction bias and
        selection; it adds the counts into the running expert load (a CPU router's
        buffer). The scores are kept only with ``losses``."""
        bias = self._buffers["e_score_correction_bias"] if self.use_correction_bias else None
        gate_bias = self._modules["gate"]._parameters["bias"]  # type: ignore[union-attr]
        return fused_topk.topk_route(
            x, weight, None if gate_bias is None else gate_bias.contiguous(),
            None if bias is None else bias.contiguous(), self.config.top_k,
            self._selection_spec, losses, self._buffers["expert_load"],
        )

    def _stackable(self, fused: list[int], flats: Sequence[torch.Tensor]) -> list[int]:
        """The calls of ``fused`` (in order) whose rows one op call stacks: as many as keep
        the stacked rows smaller than the gate [E, D] in fp32. Stacking copies the rows
        and saves reading the gate once per call, so it pays where the gate is the larger
        (DeepSeek-V3's 7 MB gate: 16 calls of 1 token 4.8 -> 0.9 ms; Mixtral's 128 KiB
        one: 4 calls of 16 tokens 124 -> 235 us, the copy the larger)."""
        budget = self.config.num_experts * 4  # bytes per hidden dim: the gate's row stride
        stacked: list[int] = []
        for i in fused:
            cost = flats[i].shape[0] * flats[i].element_size()
            if cost < budget:
                stacked.append(i)
                budget -= cost
        return stacked

    def _route_fused_together(
        self, flats: Sequence[torch.Tensor], leads: Sequence[tuple[int, ...]],
        weight: torch.Tensor,
    ) -> list[RouterOutput]:
        """Route several calls (flat [T_i, D] each, one dtype, no losses) with one fused
        op call over their rows stacked: per call, the answer :meth:`_route_fused` gives
        it alone, its counts tallied from its own indices as the op tallies them."""
        cfg = self.config
        route = self._fused_op(torch.cat(list(flats)), weight, False)
        rows = [flat.shape[0] for flat in flats]
        outputs = []
        for lead, indices, weights, per_token, logits in zip(
            leads, route.indices.split(rows), route.weights.split(rows),
            route.num_per_token.split(rows), route.logits.split(rows), strict=True,
        ):
            counts = torch.bincount(indices.reshape(-1), minlength=cfg.num_experts)
            # The op's test per row, for this call's rows alone (NaN fails it).
            bounded = route.logits_bounded or bool(
                (logits.double().abs() < LOGIT_BOUND).all())
            self.update_stats(counts, per_token, 0, indices.numel(), load_added=True)
            outputs.append(self._fused_output(lead, indices, weights, per_token, logits,
                                              counts, bounded, None, None))
        return outputs

    def _fused_output(
        self, lead: tuple[int, ...], indices: torch.Tensor, weights: torch.Tensor,
        per_token: torch.Tensor, logits: torch.Tensor, counts: torch.Tensor, bounded: bool,
        aux_loss: torch.Tensor | None, z_loss: torch.Tensor | None,
    ) -> RouterOutput:
        """One call's fused answer, its per-token tensors shaped by ``lead`` ([B, S])."""
        cfg = self.config
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
            tokens_per_expert=counts,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits_bounded=bounded,
        )

    def _fused_selection(self, op: fused_topk.FusedRoute | fused_topk.FusedSelection) -> Selection:
        """A fused op's answer as the pipeline's Selection: sigmoid scores renormalised
        into routing probabilities only when the losses read them."""
        scores = op.scores
        assert scores is not None  # the route op keeps them when the losses are asked for
        probs = scores if self.config.scoring is ScoringFunction.SOFTMAX else (
            lambda: F.renormalize(scores))
        return Selection(op.indices, op.weights, probs, {}, op.counts, op.logits_bounded)

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
                and logits.is_cpu and self._fusable_bias() and fused_topk.kernel_available()):
            return self._select_fused(logits)
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

    def _select_fused(self, logits: torch.Tensor) -> Selection:
        """:meth:`select` as one op (:func:`fused_topk.topk_select`), counts included."""
        bias = self._buffers["e_score_correction_bias"] if self.use_correction_bias else None
        return self._fused_selection(fused_topk.topk_select(
            logits if logits.is_contiguous() else logits.contiguous(),
            None if bias is None else bias.contiguous(),
            self.config.top_k,
            self._selection_spec,
        ))

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
