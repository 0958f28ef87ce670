"""RouterBase: the shared routing pipeline; each router supplies only its selection step.

validate -> logits (fp32) -> select (subclass) -> capacity -> losses -> stats -> RouterOutput
(the aux loss is taken from the selection before capacity drops anything, as Megatron-core).
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from moe_router.errors import ValidationError
from moe_router.routing import capacity, scoring
from moe_router.routing import functional as F
from moe_router.routing.gate_columns import KeptGateColumns
from moe_router.routing.output import RouterOutput, Selection
from moe_router.routing.router_config import InputNorm, RouterConfig

__all__ = ["RouterBase", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RouterBase(nn.Module, ABC):
    """Base of every router: an fp32 gate ``[E, D]`` and the shared pipeline.

    Subclasses implement :meth:`select`. Class attributes describe the router to the
    serving layer: ``couples_tokens`` (the decision for one token depends on the
    others in the batch, so calls may not be merged) and :attr:`stateful` (the answer
    depends on traffic seen so far, so it may not be cached).
    """

    couples_tokens: bool = False
    expert_load: torch.Tensor
    #: Whether select() always fills every one of its k slots (no -1 padding).
    fixed_k: bool = False
    #: Whether forward takes estimator inputs (attention_weights, logits, gradients).
    accepts_estimator_inputs: bool = False
    #: Whether select() needs the tokens' ids (``input_ids`` [T], hash routers).
    takes_input_ids: bool = False
    #: Whether a NaN, Inf or huge value in a row only makes that row's answer non-finite
    #: and never raises (the row-wise top-k family): the serving chain then judges a
    #: call's values by its [T, E] gate logits instead of reading its [T, D] input.
    values_judged_by_logits: bool = False

    input_scale: nn.Parameter  # [D], only with config.input_norm rms
    per_expert_scale: nn.Parameter  # [E], only with config.per_expert_scale
    weight_scale: nn.Parameter  # [1], only with config.learned_weight_scale

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=config.gate_bias)
        if config.input_norm is InputNorm.RMS:
            self.input_scale = nn.Parameter(torch.ones(config.hidden_size))
        if config.per_expert_scale:
            self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))
        if config.learned_weight_scale:
            self.weight_scale = nn.Parameter(torch.ones(1))
        self._stats_lock = threading.Lock()
        self._gate_columns = KeptGateColumns()
        self.register_buffer(
            "expert_load", torch.zeros(config.num_experts, dtype=torch.int64), persistent=False
        )
        self.reset_stats()

    # ----------------------------------------------------------------- description
    @property
    def num_experts(self) -> int:
        """Number of routed experts E."""
        return self.config.num_experts

    @property
    def hidden_size(self) -> int:
        """Input dimension D."""
        return self.config.hidden_size

    @property
    def k_range(self) -> tuple[int, int]:
        """(min, max) experts a token may get."""
        return (self.config.top_k, self.config.top_k)

    @property
    def stateful(self) -> bool:
        """True when the answer depends on traffic already routed (never cache it)."""
        return False

    @property
    def stochastic(self) -> bool:
        """True when the answer draws random numbers (cache only with a seed)."""
        return self.training and self.config.jitter_noise > 0

    @property
    def couples_tokens_now(self) -> bool:
        """True when calls must not be merged: token-coupled router or capacity dropping."""
        return self.couples_tokens or self.config.drops_tokens

    def gate_weight_name(self) -> str:
        """The state_dict name of the gate's [E, D] weight (what ``weights.gate`` loads)."""
        return "gate.weight"

    def version(self) -> str:
        """A short hash of the router's class, config and parameters (names its answers)."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update(type(self).__name__.encode())
        digest.update(repr(self.config).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            flat = tensor.detach().cpu().contiguous().reshape(-1)  # 0-dim buffers too
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # ----------------------------------------------------------------- pipeline
    def forward(
        self,
        hidden_states: torch.Tensor,
        generator: torch.Generator | None = None,
        return_losses: bool | None = None,
        **kwargs: Any,
    ) -> RouterOutput:
        """Route ``hidden_states`` [T, D] or [B, S, D]; results keep the leading dims.

        ``generator`` seeds any noise the router draws; ``kwargs`` carry extra tensors
        (``attention_weights``, ``logits``, ``gradients``) for complexity estimators.
        ``return_losses``: compute ``aux_loss`` and ``z_loss`` (None: in training mode
        only; serving never reads them, and they cost a third of a small call).
        """
        flat, lead = self.validate(hidden_states)
        return self.route_validated(
            flat, lead, generator=generator, return_losses=return_losses, **kwargs
        )

    def route_validated(
        self,
        flat: torch.Tensor,
        lead: tuple[int, ...],
        generator: torch.Generator | None = None,
        return_losses: bool | None = None,
        **kwargs: Any,
    ) -> RouterOutput:
        """``forward`` for an input already checked by :meth:`validate`: flat [T, D] and
        the leading dims it had. The serving chain checks once, on admission, and calls
        this so no call is validated twice."""
        logits = self.compute_router_logits(flat, generator=generator)
        selection = self.select(logits, flat, generator=generator, lead_shape=lead, **kwargs)
        return self._finish(logits, selection, lead, self._wants_losses(return_losses))

    def _wants_losses(self, return_losses: bool | None) -> bool:
        """Whether to compute the losses: as asked, else in training mode only."""
        return self.training if return_losses is None else bool(return_losses)

    def route_many(
        self,
        hidden_states: Sequence[torch.Tensor],
        generator: torch.Generator | None = None,
        return_losses: Sequence[bool] | bool | None = None,
    ) -> list[RouterOutput]:
        """Route several calls in one device pass; each answer equals ``forward`` on it alone.

        Only for routers whose decision is per token (``couples_tokens_now`` is False):
        the gate matmul is batch-invariant, selection is row-wise, and losses and counts
        are computed per call. Each input is [T_i, D] or [B_i, S_i, D].
        """
        flats, leads = zip(*(self.validate(h) for h in hidden_states), strict=True)
        return self.route_many_validated(
            flats, leads, generator=generator, return_losses=return_losses
        )

    def route_many_validated(
        self,
        flats: Sequence[torch.Tensor],
        leads: Sequence[tuple[int, ...]],
        generator: torch.Generator | None = None,
        return_losses: Sequence[bool] | bool | None = None,
    ) -> list[RouterOutput]:
        """``route_many`` for inputs already checked by :meth:`validate` (flat [T_i, D]
        views and their leading dims). ``return_losses``: one flag for all calls or one
        per call (see :meth:`forward`).

        Only the gate matmul is shared: one batched matmul per block size for every
        call, each call's rows starting on a block boundary (see
        :func:`functional.batch_invariant_linear`). Selection, capacity, losses and
        counts then run on each call's own logits [T_i, E], the very ops on tensors of
        the very shapes that routing the call alone runs. They may not run on the merged
        logits: torch's elementwise kernels (sigmoid, exp) compute a tensor's last
        partial vector on a scalar path and split a large tensor between threads by its
        size, so a call's scores came out different in the last bits depending on its
        batch mates (measured: 22 of 100 mixes for a 16-expert sigmoid router).
        """
        if self.couples_tokens_now:
            raise ValidationError(
                f"{type(self).__name__} couples the tokens of a call; route calls one by one"
            )
        sizes = [f.shape[0] for f in flats]
        dtype = flats[0].dtype
        # Each call is multiplied in blocks of its own size class, starting on a block
        # boundary: every block holds exactly what it holds when the call runs alone.
        by_block: dict[int, list[int]] = {}
        for i, n in enumerate(sizes):
            by_block.setdefault(F.gate_block_rows(n), []).append(i)
        logits: list[torch.Tensor] = [flats[0]] * len(flats)
        for block, members in by_block.items():
            padded = [
                torch.nn.functional.pad(flats[i].to(dtype), (0, 0, 0, (-sizes[i]) % block))
                for i in members
            ]
            out = self.compute_router_logits(
                torch.cat(padded), generator=generator, block_rows=block
            )
            start = 0
            for i, rows in zip(members, padded, strict=True):
                logits[i] = out[start : start + sizes[i]]
                start += rows.shape[0]
        if return_losses is None or isinstance(return_losses, bool):
            wants = [self._wants_losses(return_losses)] * len(flats)
        else:
            wants = [self._wants_losses(w) for w in return_losses]
        return [
            self._finish(
                call_logits,
                self.select(call_logits, flat, generator=generator, lead_shape=lead),
                lead,
                want,
            )
            for call_logits, flat, lead, want in zip(logits, flats, leads, wants, strict=True)
        ]

    def _finish(
        self,
        logits: torch.Tensor,
        selection: Selection,
        lead: tuple[int, ...],
        losses: bool = True,
    ) -> RouterOutput:
        """Capacity, losses (when ``losses``), padding, counts and statistics for one
        call's selection.

        Order (Megatron-core's ``TopKRouter.routing``): the aux loss counts the
        assignments of the selection (or :meth:`aux_loss_counts`) BEFORE any dropping,
        so dropping never changes it; ``tokens_per_expert`` and the statistics count
        what was kept. A fixed-k answer without dropping needs no padding pass: it
        costs what a hand-written router's does plus one bincount.
        """
        cfg = self.config
        indices, weights = selection.indices, selection.weights
        drops = cfg.drops_tokens and not self.couples_tokens
        dropped = 0
        expert_tokens = expert_token_weights = None
        if drops:
            kept = capacity.drop_for_config(
                indices, weights, selection.probs, cfg, lead, self.k_range[1]
            )
            indices, weights, dropped = kept.indices, kept.weights, kept.dropped
            expert_tokens, expert_token_weights = kept.expert_tokens, kept.expert_token_weights
        if self.fixed_k and not drops:  # every slot is real: no padding to sort out
            indices_i32 = indices.to(torch.int32)
            weights_f32 = weights if weights.dtype == torch.float32 else weights.float()
            num_per_token = indices_i32.new_full(indices.shape[:1], indices.shape[1])
            counts = selection.counts if selection.counts is not None else torch.bincount(
                indices_i32.view(-1), minlength=self.num_experts)  # unless counted already
            assignments = indices.numel()
        else:
            indices_i32, weights_f32, num_per_token = F.pad_selection(indices, weights)
            counts = F.tokens_per_expert(indices_i32, self.num_experts)
            assignments = None
        aux_loss = z_loss = None
        if losses:
            aux_loss = self._aux_loss(selection, counts if not drops else None)
            z_loss = self.compute_z_loss(logits)
        self.update_stats(counts, num_per_token, dropped, assignments)
        extras = selection.extras
        if extras:
            extras = dict(extras)
            complexity = extras.pop("complexity_scores", None)
            info = extras.pop("info", {})
        else:
            complexity, info = None, {}
        if len(lead) > 1:  # [B, S, ...]; a [T, D] call's answers are already [T, ...]
            indices_i32 = indices_i32.reshape(*lead, indices_i32.shape[-1])
            weights_f32 = weights_f32.reshape(*lead, weights_f32.shape[-1])
            num_per_token = num_per_token.reshape(lead)
            logits = logits.reshape(*lead, logits.shape[-1])
        return RouterOutput(
            expert_indices=indices_i32,
            expert_weights=weights_f32,
            num_experts_per_token=num_per_token,
            router_logits=logits,
            tokens_per_expert=counts,
            dropped_tokens=dropped,
            aux_loss=aux_loss,
            z_loss=z_loss,
            complexity_scores=None if complexity is None else complexity.reshape(lead),
            expert_tokens=None if expert_tokens is None else expert_tokens.to(torch.int32),
            expert_token_weights=(
                None if expert_token_weights is None else expert_token_weights.float()
            ),
            info=info,
            logits_bounded=selection.logits_bounded,
            **extras,
        )

    def _aux_loss(self, selection: Selection, kept_counts: torch.Tensor | None) -> torch.Tensor:
        """The call's aux loss from its selection before dropping; ``kept_counts``: the
        per-expert counts of the answer when nothing was dropped (they are the same)."""
        if type(self).compute_aux_loss is not RouterBase.compute_aux_loss:
            return self.compute_aux_loss(selection.probs, selection.indices)
        counts = self.aux_loss_counts(selection)
        if counts is None:  # the selection's own, before dropping
            counts = kept_counts if kept_counts is not None else F.tokens_per_expert(
                selection.indices, self.num_experts)
        return F.aux_loss_from_counts(selection.probs, counts, self.k_range[1])

    def aux_loss_counts(self, selection: Selection) -> torch.Tensor | None:
        """Per-expert assignment counts [E] the aux loss's f_i uses, or None for the
        router's own selection before any dropping (the default).

        A router whose selection is steered by more than the probabilities (groups, a
        bias) overrides this with Megatron's plain top-k of the probabilities over all
        experts (``config.aux_loss_assignments``).
        """
        return None

    def validate(
        self, hidden_states: torch.Tensor, name: str | None = None
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Check shape and dtype; return the flat [T, D] view and the leading dims.

        ``name`` (the hosted router's name) makes the messages say which router.
        """
        if not isinstance(hidden_states, torch.Tensor):
            raise ValidationError(
                f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}"
            )
        if hidden_states.dtype not in FLOAT_DTYPES:
            raise ValidationError(
                f"hidden_states dtype {str(hidden_states.dtype).removeprefix('torch.')} is not "
                "accepted; expected float32, float16 or bfloat16"
            )
        if hidden_states.dim() not in (2, 3):
            raise ValidationError(
                f"hidden_states must be [tokens, dim] or [batch, seq, dim], "
                f"got shape {list(hidden_states.shape)}"
            )
        if hidden_states.shape[-1] != self.hidden_size:
            who = "the router's" if name is None else f"router '{name}'"
            raise ValidationError(
                f"hidden_states dim {hidden_states.shape[-1]} does not match "
                f"{who} input_dim {self.hidden_size}"
            )
        lead = tuple(hidden_states.shape[:-1])
        flat = hidden_states if len(lead) == 1 else hidden_states.reshape(-1, self.hidden_size)
        return flat, lead  # a [T, D] input as it is: a reshape would be an op for nothing

    @property
    def required_estimator_inputs(self) -> tuple[str, ...]:
        """Estimator inputs no call can be routed without (RouterBase: none)."""
        return ()

    def check_estimator_inputs(
        self, lead: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]], who: str
    ) -> None:
        """Raise ValidationError unless this router reads each estimator input in
        ``shapes`` (name -> shape) and each has the shape it expects for hidden states
        [*lead, D]. ``who`` names the router in the message. RouterBase reads none."""
        if shapes:
            raise ValidationError(
                f"{who} takes no estimator inputs ({', '.join(sorted(shapes))}); only "
                "dynamic and adaptive routers use attention_weights, logits or gradients"
            )

    def estimator_value_problem(self, name: str, values: torch.Tensor) -> str | None:
        """Why the values of estimator input ``name`` cannot be used, or None."""
        return None

    def compute_router_logits(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        block_rows: int | None = None,
    ) -> torch.Tensor:
        """Gate logits [T, E] in fp32 (input upcast first; train-time jitter if configured).

            x      = rms_norm(x) * input_scale * D^-1/2        (input_norm rms, Gemma 4)
            logits = x @ gate.weight^T (+ gate.bias)            [T, E]
            logits = logits * logit_multiplier                   (MuseSpark)
            logits = tanh(logits / c) * c                        (logit_softcap c, Laguna)

        Every step is row-wise and the matmul batch-invariant
        (:func:`functional.batch_invariant_linear`), so a token's logits do not depend on
        its batch mates; ``block_rows`` is set by :meth:`route_many` to the merged call's
        own block size.
        """
        cfg = self.config
        input_dtype = x.dtype
        if input_dtype != torch.float32:  # a dtype check costs less than a no-op cast
            x = x.float()
        eps = cfg.jitter_noise
        if self.training and eps > 0:
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x * (1.0 - eps + 2.0 * eps * noise)
        if cfg.input_norm is InputNorm.RMS:
            x = scoring.rms_scaled(x, self.input_scale.float(), cfg.input_norm_eps, input_dtype)
        weight, bias = self.gate.weight, self.gate.bias
        rows = F.gate_block_rows(x.shape[0]) if block_rows is None else block_rows
        logits = F.batch_invariant_linear(x, weight, None if bias is None else bias.float(),
                                          rows, columns=self._gate_columns(weight, rows))
        return scoring.transform_logits(logits, cfg.logit_multiplier, cfg.logit_softcap)

    @abstractmethod
    def select(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        /,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Selection:
        """Choose experts for flat logits [T, E]; return indices/weights [T, k] and probs."""

    def compute_aux_loss(
        self, router_logits_or_probs: torch.Tensor, expert_indices: torch.Tensor
    ) -> torch.Tensor:
        """Switch load-balancing loss of this call (see :func:`functional.compute_aux_loss`)."""
        return F.compute_aux_loss(router_logits_or_probs, expert_indices, self.k_range[1])

    def compute_z_loss(self, router_logits: torch.Tensor) -> torch.Tensor:
        """Router z-loss of this call (see :func:`functional.compute_z_loss`)."""
        return F.compute_z_loss(router_logits)

    # ----------------------------------------------------------------- statistics
    def update_stats(self, counts: torch.Tensor, num_per_token: torch.Tensor, dropped: int = 0,
                     assignments: int | None = None, load_added: bool = False) -> None:
        """Add one call's per-expert assignments to the running statistics.

        ``assignments`` (sum of ``num_per_token``) may be passed when already known;
        ``load_added``: the counts are in ``expert_load`` already (the fused op adds them).
        """
        tokens = int(num_per_token.numel())
        assignments = int(num_per_token.sum()) if assignments is None else assignments
        load: torch.Tensor = self._buffers["expert_load"]  # type: ignore[assignment]  # not __getattr__: 0.5 us
        if not load_added and counts.get_device() != load.get_device():  # ints, not devices
            counts = counts.to(load.device)
        with self._stats_lock:  # counts are integers: never part of an autograd graph
            if not load_added:
                load.add_(counts)
            totals = self._totals
            totals.batches += 1
            totals.tokens += tokens
            totals.assignments += assignments
            totals.dropped += dropped

    def get_stats(self) -> dict[str, Any]:
        """Running statistics since the last reset (counts are cumulative)."""
        with self._stats_lock:
            load = self.expert_load.detach().cpu()
            totals = self._totals
            tokens = totals.tokens
            stats = {
                "total_batches": totals.batches,
                "total_tokens": tokens,
                "tokens_per_expert": load.tolist(),
                "dropped_tokens": totals.dropped,
                "avg_experts_per_token": totals.assignments / tokens if tokens else 0.0,
            }
        loadf = load.double()
        stats.update(
            avg_usage_per_expert=(loadf / max(tokens, 1)).tolist(),
            usage_variance=float(loadf.var(unbiased=False)) if loadf.numel() else 0.0,
            most_used_expert=int(torch.argmax(load)) if load.numel() else -1,
            least_used_expert=int(torch.argmin(load)) if load.numel() else -1,
            load_balance_score=F.load_balance_score(load),
        )
        return stats

    def reset_stats(self) -> None:
        """Forget every running statistic."""
        with self._stats_lock:
            self.expert_load.zero_()
            self._totals = _RunningTotals()


class _RunningTotals:
    """Counters of RouterBase statistics, kept off nn.Module (whose __setattr__ is slow)."""

    __slots__ = ("batches", "tokens", "assignments", "dropped")

    def __init__(self) -> None:
        self.batches = 0
        self.tokens = 0
        self.assignments = 0
        self.dropped = 0
