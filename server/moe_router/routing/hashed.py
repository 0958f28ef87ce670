"""HashRouter: experts chosen by token id from a fixed table (DeepSeek-V4's hash layers)."""

from __future__ import annotations

from typing import Any

import torch

from moe_router.errors import RouterConfigurationError, ValidationError
from moe_router.routing import functional as F
from moe_router.routing.base import RouterBase
from moe_router.routing.output import Selection
from moe_router.routing.router_config import RouterConfig, ScoringFunction

__all__ = ["HashRouter", "INPUT_ID_DTYPES"]

INPUT_ID_DTYPES = (torch.int32, torch.int64)
"""dtypes ``input_ids`` may have."""


class HashRouter(RouterBase):
    """Route each token to the experts a frozen table gives its token id.

    Shapes: T tokens, V vocabulary, E experts, k = top_k.

        indices = token_experts[input_ids]                 [T, k]   (table [V, k])
        scores  = score(gate(x))                           [T, E]   (learned gate)
        weights = scores[indices] / (sum + renormalize_eps)  if renormalize
        weights *= routed_scaling_factor

    The gate still weighs the chosen experts; only *which* experts is static
    (transformers' ``DeepseekV4HashRouter``, whose ``tid2eid`` buffer is the table; the
    DeepSeek-V4 paper, section 2.1). Every call needs ``input_ids`` (int32 or int64,
    shaped like hidden_states' leading dims, each in [0, V)).
    """

    fixed_k = True
    takes_input_ids = True

    token_experts: torch.Tensor  # [V, k] int64, from the checkpoint

    def __init__(self, config: RouterConfig, vocab_size: int | None = None) -> None:
        if vocab_size is None:
            raise RouterConfigurationError(
                "vocab_size: required for a hash router (the rows of its token-id table, "
                "DeepSeek-V4's vocab_size)"
            )
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise RouterConfigurationError(
                f"vocab_size: must be a positive integer (the token-id table's rows), "
                f"got {vocab_size!r}"
            )
        super().__init__(config)
        self.vocab_size = vocab_size
        self.register_buffer(
            "token_experts", torch.zeros(vocab_size, config.top_k, dtype=torch.int64)
        )

    def check_input_ids(
        self, input_ids: torch.Tensor | None, lead: tuple[int, ...], who: str = "router"
    ) -> torch.Tensor:
        """``input_ids`` as flat int64 [T]; ValidationError naming input_ids otherwise.

        lead: the leading dims of hidden_states ([T] or [B, S]), which input_ids must have.
        """
        expected = f"an INT32 or INT64 tensor of shape {list(lead)} (hidden_states' leading dims)"
        if input_ids is None:
            raise ValidationError(
                f"input_ids: {who} routes by token id and needs input_ids, {expected}"
            )
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in INPUT_ID_DTYPES:
            got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids)
            raise ValidationError(f"input_ids: must be {expected}, got dtype {got}")
        if tuple(input_ids.shape) != tuple(lead):
            raise ValidationError(
                f"input_ids: must be {expected}, got shape {list(input_ids.shape)}"
            )
        flat = input_ids.reshape(-1).to(torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.vocab_size):
            raise ValidationError(
                f"input_ids: token ids must be in [0, {self.vocab_size}) (the hash table's "
                f"vocabulary), got values in [{int(flat.min())}, {int(flat.max())}]"
            )
        return flat

    def select(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        /,
        generator: torch.Generator | None = None,
        input_ids: torch.Tensor | None = None,
        lead_shape: tuple[int, ...] | None = None,
        **kwargs: Any,
    ) -> Selection:
        """The table's experts for input_ids [T]; indices/weights [T, k], probs [T, E]."""
        cfg = self.config
        lead = lead_shape if lead_shape is not None else (logits.shape[0],)
        ids = self.check_input_ids(input_ids, lead).to(logits.device)
        indices = self.token_experts[ids]
        scores = F.score(logits, cfg.scoring)
        weights = scores.gather(1, indices)
        if cfg.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + cfg.renormalize_eps)
        weights = weights * cfg.routed_scaling_factor
        probs = scores if cfg.scoring is ScoringFunction.SOFTMAX else F.renormalize(scores)
        return Selection(indices, weights, probs, {})
