"""The seed's ``MoERouter`` (an MLP scorer with softmax or Gumbel-softmax) and
``MLPTopKRouter``, which serves it as a top-k router through the shared pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

import torch
from torch import nn

from moe_router.errors import RouterConfigurationError, ValidationError
from moe_router.routing import functional as F
from moe_router.routing.base import FLOAT_DTYPES, RouterBase
from moe_router.routing.output import Selection
from moe_router.routing.router_config import RouterConfig, ScoringFunction

__all__ = ["Mechanism", "Activation", "HiddenNorm", "MLPLayer", "MoERouter", "MLPTopKRouter"]


class Mechanism(str, Enum):
    """How MoERouter turns expert logits into probabilities."""

    SOFTMAX = "softmax"
    GUMBEL = "gumbel"


class Activation(str, Enum):
    """The activation after a hidden layer of the MLP gate (``gelu`` is the exact, erf one)."""

    NONE = "none"
    RELU = "relu"
    GELU = "gelu"
    SILU = "silu"
    TANH = "tanh"


class HiddenNorm(str, Enum):
    """A normalisation after a hidden layer's activation: ``rms`` is RMSNorm with a learned
    weight, weight * h * (mean(h^2) + eps)^-1/2 (T5 / Zaya's ``ZayaRMSNorm``)."""

    NONE = "none"
    RMS = "rms"


@dataclass(frozen=True)
class MLPLayer:
    """One hidden layer of an MLP gate: Linear(width, bias) -> activation -> norm.

    Zaya's router (transformers ``ZayaRouter``) is ``[{width: H, activation: none,
    norm: rms}, {width: H, activation: gelu}, {width: H, activation: gelu}]`` with
    ``output_bias: false``: its ``down_proj``, then ``router_mlp``'s norm, fc1, fc2.
    """

    width: int
    activation: Activation = Activation.RELU
    bias: bool = True
    norm: HiddenNorm = HiddenNorm.NONE
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name, enum in (("activation", Activation), ("norm", HiddenNorm)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                allowed = ", ".join(repr(m.value) for m in enum)
                raise ValueError(f"{name}: must be one of {allowed}, got {value!r}") from None


_ACTIVATIONS = {
    Activation.RELU: torch.relu,
    Activation.GELU: torch.nn.functional.gelu,
    Activation.SILU: torch.nn.functional.silu,
    Activation.TANH: torch.tanh,
}


class _RMSNorm(nn.Module):
    """weight * h * (mean(h^2) + eps)^-1/2 over the last dim, in fp32."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mean_squared = h.pow(2).mean(-1, keepdim=True) + self.eps
        return self.weight.float() * (h * F.batch_invariant_elementwise(torch.rsqrt, mean_squared))


def _layer_specs(mlp_layers: Sequence[Any]) -> list[MLPLayer]:
    """Checked MLPLayer values (also from any object with the same attributes)."""
    specs = []
    for i, layer in enumerate(mlp_layers):
        name = f"mlp_layers[{i}]"
        try:
            spec = layer if isinstance(layer, MLPLayer) else MLPLayer(
                width=layer.width, activation=layer.activation, bias=layer.bias,
                norm=layer.norm, norm_eps=layer.norm_eps,
            )
        except AttributeError as exc:
            raise ValueError(f"{name}: not an MLP layer ({exc})") from None
        except ValueError as exc:
            raise ValueError(f"{name}.{exc}") from None
        _positive_int(spec.width, f"{name}.width")
        if not isinstance(spec.bias, bool):
            raise ValueError(f"{name}.bias: must be true or false, got {spec.bias!r}")
        if not (isinstance(spec.norm_eps, float) and 0 < spec.norm_eps < 1):
            raise ValueError(f"{name}.norm_eps: must be in (0, 1), got {spec.norm_eps!r}")
        specs.append(spec)
    return specs


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
    ``mlp_layers`` (instead of ``hidden_layers``): one :class:`MLPLayer` per hidden
    layer, each Linear -> its activation -> its norm; ``output_bias`` whether the last
    Linear to E has a bias.
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
        *,
        mlp_layers: Sequence[Any] | None = None,
        output_bias: bool = True,
    ) -> None:
        super().__init__()
        self.dim = _positive_int(dim, "dim")
        self.num_experts = _positive_int(num_experts, "num_experts")
        try:
            self.mechanism = Mechanism(mechanism)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in Mechanism)
            raise ValueError(f"mechanism: must be one of {allowed}, got {mechanism!r}") from None
        if mlp_layers is not None and hidden_layers:
            raise ValueError("mlp_layers: give either hidden_layers or mlp_layers, not both")
        if not isinstance(output_bias, bool):
            raise ValueError(f"output_bias: must be true or false, got {output_bias!r}")
        if mlp_layers is not None:
            specs = _layer_specs(mlp_layers)
        else:
            specs = [MLPLayer(width) for width in _hidden_widths(hidden_layers)]
        self.specs = tuple(specs)
        widths = [self.dim, *(spec.width for spec in specs), self.num_experts]
        biases = [spec.bias for spec in specs] + [output_bias]
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out, bias=bias)
            for n_in, n_out, bias in zip(widths[:-1], widths[1:], biases, strict=True)
        )
        self.norms = nn.ModuleList(
            _RMSNorm(spec.width, spec.norm_eps) if spec.norm is HiddenNorm.RMS else nn.Identity()
            for spec in specs
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
            bias = None if layer.bias is None else layer.bias.float()
            h = F.batch_invariant_linear(h, layer.weight.float(), bias, block_rows)
            if i < len(self.specs):
                activation = _ACTIVATIONS.get(self.specs[i].activation)
                if activation is not None:
                    h = F.batch_invariant_elementwise(activation, h)
                h = self.norms[i](h)
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

    Shapes: T tokens, E experts (+1 scorer output with ``skip_expert``), k = top_k.

        logits  = MoERouter MLP(x)                                [T, E(+1)] (router_logits)
        probs   = softmax(logits), or Gumbel-softmax in training  [T, E(+1)]
        choice  = probs (+ e_score_correction_bias [E(+1)])  (``use_correction_bias``)
        indices = topk(choice, k)           (ties -> lower index) [T, k]
        weights = probs[indices]
        skip expert (id E) chosen: that slot is answered as padding (-1, weight 0)
        weights /= sum(weights) if renormalize; weights *= routed_scaling_factor

    ``self.gate`` is the MoERouter (``config.gate_bias`` is not used; each Linear's bias
    follows ``mlp_layers`` / ``output_bias``). ``config.scoring`` must be softmax: the
    mechanism does the scoring. ``skip_expert`` is Zaya's extra "skip" class: a token
    choosing it gets one expert fewer (transformers ``ZayaRouter`` zeroes its weight;
    the balancing bias, here the correction bias, steers it).
    """

    fixed_k = True

    gate: MoERouter  # type: ignore[assignment]  # the MLP replaces the base's Linear gate
    e_score_correction_bias: torch.Tensor  # [E(+1)], only with use_correction_bias

    def __init__(
        self,
        config: RouterConfig,
        hidden_layers: Sequence[int] | int | None = None,
        mechanism: str | Mechanism = "softmax",
        *,
        mlp_layers: Sequence[Any] | None = None,
        output_bias: bool = True,
        skip_expert: bool = False,
        use_correction_bias: bool = False,
    ) -> None:
        if config.scoring is not ScoringFunction.SOFTMAX:
            raise RouterConfigurationError(
                "scoring: MLPTopKRouter scores with its mechanism; must be 'softmax', "
                f"got {config.scoring.value!r}"
            )
        for name, flag in (("skip_expert", skip_expert),
                           ("use_correction_bias", use_correction_bias)):
            if not isinstance(flag, bool):
                raise RouterConfigurationError(f"{name}: must be true or false, got {flag!r}")
        classes = config.num_experts + int(skip_expert)
        try:
            scorer = MoERouter(config.hidden_size, classes, hidden_layers, mechanism,
                               mlp_layers=mlp_layers, output_bias=output_bias)
        except ValueError as exc:
            raise RouterConfigurationError(str(exc)) from exc
        super().__init__(config)
        self.gate = scorer
        self.skip_expert = skip_expert
        self.fixed_k = not skip_expert
        self.use_correction_bias = use_correction_bias
        if use_correction_bias:
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(classes, dtype=torch.float32))

    def gate_weight_name(self) -> str:
        """The MLP's output layer weight [E(+1), width]."""
        return f"gate.layers.{len(self.gate.layers) - 1}.weight"

    @property
    def k_range(self) -> tuple[int, int]:
        """(k - 1 with a skip expert, else k; k)."""
        k = self.config.top_k
        return (k - 1 if self.skip_expert else k, k)

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
        """The MLP's expert logits [T, E(+1)] in fp32 (train-time jitter if configured)."""
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
        cfg = self.config
        probs = self.gate.probabilities(logits, generator)
        choice = probs
        if self.use_correction_bias:
            choice = probs + self.e_score_correction_bias.float()
        indices = F.topk_lowest_index(choice, cfg.top_k)[1]
        weights = probs.gather(1, indices)
        if self.skip_expert:
            skipped = indices == cfg.num_experts
            indices = indices.masked_fill(skipped, -1)
            weights = weights.masked_fill(skipped, 0.0)
        if cfg.renormalize:
            weights = F.renormalize(weights, cfg.renormalize_eps)
        weights = weights * cfg.routed_scaling_factor
        return Selection(indices, weights, probs[:, : cfg.num_experts], {})
