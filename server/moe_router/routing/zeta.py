"""The seed's ``MoERouter`` (an MLP scorer with softmax or Gumbel-softmax) and
``MLPTopKRouter``, which serves it as a top-k router through the shared pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any, cast

import torch
from torch import nn

from moe_router.errors import RouterConfigurationError, ValidationError
from moe_router.routing import functional as F
from moe_router.routing.base import FLOAT_DTYPES, RouterBase
from moe_router.routing.output import Selection
from moe_router.routing.router_config import RouterConfig, ScoringFunction

__all__ = ["Mechanism", "MoERouter", "MLPTopKRouter"]


class Mechanism(str, Enum):
    """How MoERouter turns expert logits into probabilities."""

    SOFTMAX = "softmax"
    GUMBEL = "gumbel"


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return value


def _hidden_widths(hidden_layers: Sequence[int] | int | None) -> list[int]:
    if hidden_layers is None:
        return []
    if isinstance(hidden_layers, int) and not isinstance(hidden_layers, bool):
        return [_positive_int(hidden_layers, "hidden_layers")]
    if isinstance(hidden_layers, (str, bytes)) or not isinstance(hidden_layers, Sequence):
        raise ValueError(
            "hidden_layers: must be None, a positive integer or a list of positive "
            f"integers, got {hidden_layers!r}"
        )
    return [_positive_int(w, f"hidden_layers[{i}]") for i, w in enumerate(hidden_layers)]


class MoERouter(nn.Module):
    """An MLP that scores ``num_experts`` experts for every token: [..., dim] -> [..., E].

    ``hidden_layers``: None for a single Linear(dim, E); an int for one hidden layer of
    that width; a list for one Linear + ReLU per width, then a Linear to E.
    ``mechanism``: ``"softmax"`` (probabilities over the experts, the last dim) or
    ``"gumbel"`` (soft Gumbel-softmax, tau = 1, as ``torch.nn.functional.gumbel_softmax``
    with ``hard=False``). Gumbel noise is drawn only in training mode, like dropout; in
    eval mode ``"gumbel"`` gives the deterministic softmax. Pass a ``torch.Generator``
    to make the noise reproducible. Any other mechanism raises ValueError, as does any
    other invalid argument; a bad input (not a float tensor, wrong last dim) raises
    ValidationError. Math in fp32 whatever the input dtype; the output is fp32
    probabilities with the input's leading shape, e.g. (B, SEQ, NUM_EXPERTS).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        hidden_layers: Sequence[int] | int | None = None,
        mechanism: str | Mechanism = "softmax",
    ) -> None:
        super().__init__()
        self.dim = _positive_int(dim, "dim")
        self.num_experts = _positive_int(num_experts, "num_experts")
        try:
            self.mechanism = Mechanism(mechanism)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in Mechanism)
            raise ValueError(f"mechanism: must be one of {allowed}, got {mechanism!r}") from None
        widths = [self.dim, *_hidden_widths(hidden_layers), self.num_experts]
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out) for n_in, n_out in zip(widths[:-1], widths[1:], strict=True)
        )

    def compute_logits(self, x: torch.Tensor, block_rows: int | None = None) -> torch.Tensor:
        """Expert logits [..., E] in fp32 for ``x`` [..., dim]; every layer multiplies
        through :func:`functional.batch_invariant_linear`, as the base router's gate does."""
        if not isinstance(x, torch.Tensor):
            raise ValidationError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValidationError(
                f"x dtype {x.dtype} is not accepted; expected float32, float16 or bfloat16"
            )
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValidationError(
                f"x must be [..., dim] with dim {self.dim}, got shape {list(x.shape)}"
            )
        lead = x.shape[:-1]
        h = x.reshape(-1, self.dim).float()
        for i, module in enumerate(self.layers):
            layer = cast(nn.Linear, module)
            h = F.batch_invariant_linear(
                h, layer.weight.float(), layer.bias.float(), block_rows
            )
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return h.reshape(*lead, self.num_experts)

    def probabilities(
        self, logits: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Probabilities [..., E] from logits [..., E] under the mechanism (fp32)."""
        logits = logits.float()
        if self.mechanism is Mechanism.GUMBEL and self.training:
            # -log(Exp(1)) is Gumbel(0, 1), drawn as torch's gumbel_softmax draws it.
            exponential = torch.empty_like(logits).exponential_(generator=generator)
            logits = logits - exponential.log()
        return torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Routing probabilities [..., E] for ``x`` [..., dim], e.g. (B, SEQ, NUM_EXPERTS)."""
        return self.probabilities(self.compute_logits(x), generator)


class MLPTopKRouter(RouterBase):
    """Top-k routing over a :class:`MoERouter` scorer (config.yaml kind ``moe_router``).

        logits  = MoERouter MLP(x)                                [T, E]  (router_logits)
        probs   = softmax(logits), or Gumbel-softmax in training  [T, E]
        weights, indices = topk(probs, k)   (ties -> lower index) [T, k]
        weights /= sum(weights) if renormalize; weights *= routed_scaling_factor

    ``self.gate`` is the MoERouter (its Linear layers carry biases; ``config.gate_bias``
    is not used). ``config.scoring`` must be softmax: the mechanism does the scoring.
    """

    fixed_k = True

    gate: MoERouter  # type: ignore[assignment]  # the MLP replaces the base's Linear gate

    def __init__(
        self,
        config: RouterConfig,
        hidden_layers: Sequence[int] | int | None = None,
        mechanism: str | Mechanism = "softmax",
    ) -> None:
        if config.scoring is not ScoringFunction.SOFTMAX:
            raise RouterConfigurationError(
                "scoring: MLPTopKRouter scores with its mechanism; must be 'softmax', "
                f"got {config.scoring.value!r}"
            )
        try:
            scorer = MoERouter(config.hidden_size, config.num_experts, hidden_layers, mechanism)
        except ValueError as exc:
            raise RouterConfigurationError(str(exc)) from exc
        super().__init__(config)
        self.gate = scorer

    @property
    def mechanism(self) -> Mechanism:
        """The scorer's mechanism (softmax or gumbel)."""
        return self.gate.mechanism

    @property
    def stochastic(self) -> bool:
        """True in training with Gumbel noise or input jitter."""
        return self.training and (
            self.mechanism is Mechanism.GUMBEL or self.config.jitter_noise > 0
        )

    def compute_router_logits(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        block_rows: int | None = None,
    ) -> torch.Tensor:
        """The MLP's expert logits [T, E] in fp32 (train-time jitter if configured)."""
        x = x.float()
        eps = self.config.jitter_noise
        if self.training and eps > 0:
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x * (1.0 - eps + 2.0 * eps * noise)
        return self.gate.compute_logits(x, block_rows)

    def select(
        self,
        logits: torch.Tensor,
        hidden_states: torch.Tensor,
        /,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> Selection:
        """Top-k of the mechanism's probabilities; indices/weights [T, k], probs [T, E]."""
        probs = self.gate.probabilities(logits, generator)
        weights, indices = F.topk_lowest_index(probs, self.config.top_k)
        if self.config.renormalize:
            weights = F.renormalize(weights)
        weights = weights * self.config.routed_scaling_factor
        return Selection(indices, weights, probs, {})
