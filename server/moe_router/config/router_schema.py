"""The typed shape of one ``routers:`` entry of config.yaml: the router, its weights, its
injected faults. Import them from :mod:`moe_router.config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from moe_router.config.fields import config_field as _field
from moe_router.routing.dynamic import RoutingStrategy
from moe_router.routing.estimators import EstimatorName
from moe_router.routing.kinds import RoutingMethod, kind_entry, kinds_using
from moe_router.routing.router_config import (
    AuxLossAssignments,
    CapacityPriority,
    CapacityScope,
    CorrectionBiasTarget,
    DropPolicy,
    GroupMaskFill,
    GroupScore,
    InputNorm,
    RouterConfig,
    ScoringFunction,
)
from moe_router.routing.zeta import Mechanism, MLPLayer

__all__ = ["BatchingConfig", "RouterKind", "WeightsInit", "WeightsSpec", "FaultSpec",
           "RouterSpec"]

RouterKind = RoutingMethod
"""Which router class a RouterSpec builds (``kind`` in config.yaml): the one kind enum,
:class:`moe_router.routing.RoutingMethod`, whose table (class, keys, description) is
:data:`moe_router.routing.kinds.ROUTER_KINDS`."""


@dataclass(frozen=True, kw_only=True)
class BatchingConfig:
    """Dynamic batching of concurrent calls into one device call (per router, see RouterSpec)."""

    enabled: bool = _field(True, "Merge concurrent calls of per-token routers.")
    max_batch_tokens: int = _field(8192, "Most tokens in one merged device call.", lo=1)
    max_queue_delay_us: int = _field(500, "Longest a call waits for company, microseconds.",
                                     lo=0)
    max_queue_size: int = _field(1024, "Calls queued before new ones are refused.", lo=1)
    inline_max_us: int = _field(1000, "Device passes measured to cost at most this much CPU "
                                "time (microseconds, a running mean per power-of-two token "
                                "count) run on the event loop instead of a device thread "
                                "when no other pass of the router is running; 0: never.", lo=0)


class WeightsInit(str, Enum):
    """Where gate weights come from when no checkpoint is named."""

    RANDOM = "random"


@dataclass(frozen=True, kw_only=True)
class WeightsSpec:
    """Where a router's gate weights come from: random init, or a safetensors checkpoint.

    Either ``init: random`` (+ ``seed``; layer L gets seed + L), or ``path`` + ``gate``
    (+ ``bias``, ``layer_offset``). ``path`` is a ``.safetensors`` file or a sharded
    ``model.safetensors.index.json``; relative paths are resolved against the config
    file's directory. Templates take ``{layer}``: checkpoint layer = layer_offset + L.
    """

    init: WeightsInit | None = _field(WeightsInit.RANDOM, "random, or null with path.")
    seed: int = _field(0, "Random init seed; layer L uses seed + L.", lo=0)
    path: Path | None = _field(None, "Checkpoint: .safetensors or model.safetensors.index.json.")
    gate: str | None = _field(None, "Gate weight [E, D] name template, e.g. "
                              "'model.layers.{layer}.block_sparse_moe.gate.weight'.")
    bias: str | None = _field(None, "Correction bias [E] name template, e.g. "
                              "'model.layers.{layer}.mlp.gate.e_score_correction_bias'.")
    layer_offset: int = _field(0, "Checkpoint layer index of our layer 0 (e.g. 3 for "
                               "DeepSeek-V3, whose first 3 layers are dense).", lo=0)
    checkpoint_layers: tuple[int, ...] | None = _field(
        None, "Checkpoint layer of each of our layers, when the MoE layers are not "
        "consecutive (e.g. Jamba's every other layer); replaces layer_offset.", lo=0)
    tensors: Mapping[str, str] = _field(
        doc="More router tensors: router state_dict name -> checkpoint name template, e.g. "
        "{input_scale: 'model.layers.{layer}.router.scale'} (Gemma 4), "
        "{token_experts: 'model.layers.{layer}.mlp.gate.tid2eid'} (hash routers).",
        factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, kw_only=True)
class FaultSpec:
    """Test-only failure switches of a fault_injection router (files toggled by the test)."""

    fail_while_file_exists: Path | None = _field(None, "Calls raise while this file exists.")
    slow_while_file_exists: Path | None = _field(None, "Calls stall while this file exists.")
    slow_ms: float = _field(0.0, "How long a stalled call sleeps, milliseconds.", lo=0)


@dataclass(frozen=True, kw_only=True)
class RouterSpec:
    """One hosted router: its algorithm, parameters, weights and serving options.

    Keys other than the common ones are valid only for the kinds listed in their field
    metadata (``kinds``, read from the kind table :data:`moe_router.routing.kinds.ROUTER_KINDS`);
    a key a kind does not use is an error. Fields a kind does not use keep their
    defaults and are ignored.
    """

    name: str = _field(doc="Unique router name used by requests: lowercase [a-z0-9_-].",
                       pattern=r"[a-z0-9_-]+",
                       pattern_help="lowercase letters, digits, '_' and '-'")
    kind: RouterKind = _field(doc="Routing algorithm.")
    input_dim: int = _field(doc="Hidden size D of the tokens routed.")
    num_experts: int = _field(doc="Routed experts E.")
    layers: int = _field(1, "MoE layers served (requests name one, 0-based).", lo=1)
    # Kind-specific keys: which kinds read each one is the kind table's answer.
    top_k: int = _field(2, "Experts per token.", kinds=kinds_using("top_k"))
    scoring: ScoringFunction = _field(ScoringFunction.SOFTMAX, "softmax | sigmoid of the "
                                      "gate logits.", kinds=kinds_using("scoring"))
    renormalize: bool = _field(True, "Chosen weights sum to 1 (HF norm_topk_prob).",
                               kinds=kinds_using("renormalize"))
    routed_scaling_factor: float = _field(1.0, "Final weights are multiplied by this.",
                                          kinds=kinds_using("routed_scaling_factor"))
    n_group: int = _field(1, "Expert groups (DeepSeek n_group).", kinds=kinds_using("n_group"))
    topk_group: int = _field(1, "Groups kept per token.", kinds=kinds_using("topk_group"))
    group_score: GroupScore = _field(GroupScore.MAX, "max (DeepSeek-V2) | top2_sum (V3).",
                                     kinds=kinds_using("group_score"))
    use_correction_bias: bool = _field(False, "Selection adds e_score_correction_bias [E].",
                                       kinds=kinds_using("use_correction_bias"))
    correction_bias_target: CorrectionBiasTarget = _field(
        CorrectionBiasTarget.SCORES, "scores | logits: what the correction bias is added "
        "to before the top-k (logits: Kolibri 1).", kinds=kinds_using("correction_bias_target"))
    group_mask_fill: GroupMaskFill = _field(
        GroupMaskFill.NEG_INF, "neg_inf | zero: the value of dropped groups' experts "
        "(zero: transformers' DeepSeek-V2, Mistral 4).", kinds=kinds_using("group_mask_fill"))
    gate_bias: bool = _field(False, "The gate linear layer has a bias [E] (GPT-OSS).",
                             kinds=kinds_using("gate_bias"))
    logit_multiplier: float = _field(1.0, "Logits are multiplied by this before scoring "
                                     "(MuseSpark's output_multiplier).", gt=0,
                                     kinds=kinds_using("logit_multiplier"))
    logit_softcap: float | None = _field(None, "Soft cap c: logits = tanh(logits/c)*c "
                                         "before scoring (Laguna); null for none.", gt=0,
                                         kinds=kinds_using("logit_softcap"))
    renormalize_eps: float = _field(1e-20, "eps of w / (sum w + eps) when renormalizing.",
                                    lo=0, kinds=kinds_using("renormalize_eps"))
    input_norm: InputNorm = _field(InputNorm.NONE, "none | rms: normalise the router input "
                                   "(rms: Gemma 4, with a learned input_scale [D]).",
                                   kinds=kinds_using("input_norm"))
    input_norm_eps: float = _field(1e-6, "eps of the rms input norm.", gt=0,
                                   kinds=kinds_using("input_norm_eps"))
    per_expert_scale: bool = _field(False, "Weights times a learned per_expert_scale [E] "
                                    "(Gemma 4).", kinds=kinds_using("per_expert_scale"))
    learned_weight_scale: bool = _field(False, "Weights times a learned weight_scale [1] "
                                        "(Inkling's global_scale).",
                                        kinds=kinds_using("learned_weight_scale"))
    scored_shared_experts: int = _field(0, "The last N experts are shared ones the gate "
                                        "scores: every token takes them and their scores "
                                        "join the normalisation (Inkling).", lo=0,
                                        kinds=kinds_using("scored_shared_experts"))
    vocab_size: int | None = _field(None, "Rows of the hash router's token-id table.", lo=1,
                                    kinds=kinds_using("vocab_size"))
    sparsemixer_eps: float = _field(0.01, "SparseMixer's eps (PhiMoE router_jitter_noise).",
                                    lo=0, hi=1, kinds=kinds_using("sparsemixer_eps"))
    capacity_factor: float | None = _field(None, "Per-expert capacity ceil(T*k/E*factor); "
                                           "null for none.",
                                           kinds=kinds_using("capacity_factor"))
    drop_policy: DropPolicy = _field(DropPolicy.PROBS, "Over capacity, keep the highest "
                                     "final weights (Megatron) or the earliest tokens.",
                                     kinds=kinds_using("drop_policy"))
    expert_capacity: int | None = _field(None, "Absolute capacity per expert (Switch/NLLB "
                                         "expert_capacity); not with capacity_factor.", lo=1,
                                         kinds=kinds_using("expert_capacity"))
    capacity_scope: CapacityScope = _field(CapacityScope.CALL, "call | sequence: capacity "
                                           "over all tokens, or per sequence (Switch).",
                                           kinds=kinds_using("capacity_scope"))
    capacity_priority: CapacityPriority = _field(CapacityPriority.EXPERT, "expert (Megatron) "
                                                 "| slot: first choices before second ones "
                                                 "(GShard, Switch, NLLB-MoE).",
                                                 kinds=kinds_using("capacity_priority"))
    renormalize_after_drop: bool = _field(False, "Renormalise the kept weights after "
                                          "dropping (NLLB-MoE).",
                                          kinds=kinds_using("renormalize_after_drop"))
    pad_to_capacity: bool = _field(False, "Answer expert_tokens [E, capacity], -1 padded "
                                   "(Megatron's pad_to_capacity).",
                                   kinds=kinds_using("pad_to_capacity"))
    aux_loss_assignments: AuxLossAssignments = _field(AuxLossAssignments.TOP_K, "top_k "
                                                      "(Megatron) | selected: what f_i of "
                                                      "the aux loss counts.",
                                                      kinds=kinds_using("aux_loss_assignments"))
    tokens_per_expert: int | None = _field(None, "Fixed expert-choice capacity; null derives "
                                           "it from capacity_factor.", lo=1,
                                           kinds=kinds_using("tokens_per_expert"))
    slots_per_expert: int = _field(1, "Soft-MoE slots per expert (gate is [E*slots, D]).",
                                   lo=1, kinds=kinds_using("slots_per_expert"))
    temperature: float = _field(1.0, "Soft-MoE softmax temperature.", gt=0,
                                kinds=kinds_using("temperature"))
    hidden_layers: tuple[int, ...] | None = _field(None, "Hidden widths of the MLP router.",
                                                   lo=1, kinds=kinds_using("hidden_layers"))
    mechanism: Mechanism = _field(Mechanism.SOFTMAX, "softmax | gumbel.",
                                  kinds=kinds_using("mechanism"))
    mlp_layers: tuple[MLPLayer, ...] | None = _field(
        None, "Hidden layers of the MLP router instead of hidden_layers: each {width, "
        "activation: none|relu|gelu|silu|tanh, bias, norm: none|rms, norm_eps}.",
        kinds=kinds_using("mlp_layers"))
    output_bias: bool = _field(True, "The MLP router's last layer has a bias.",
                               kinds=kinds_using("output_bias"))
    skip_expert: bool = _field(False, "The MLP router scores one more, 'skip' expert; a "
                               "token choosing it gets one expert fewer (Zaya).",
                               kinds=kinds_using("skip_expert"))
    min_experts: int = _field(1, "Fewest experts a token gets.", lo=1,
                              kinds=kinds_using("min_experts"))
    max_experts: int | None = _field(None, "Most experts a token gets; null lets the router "
                                     "choose (num_experts // 2).", lo=1,
                                     kinds=kinds_using("max_experts"))
    complexity_estimator: EstimatorName = _field(EstimatorName.GRADIENT_NORM, "How token "
                                                 "complexity is scored.",
                                                 kinds=kinds_using("complexity_estimator"))
    routing_strategy: RoutingStrategy = _field(RoutingStrategy.TOP_K, "top_k | threshold.",
                                               kinds=kinds_using("routing_strategy"))
    load_balancing: bool = _field(True, "Steer load toward under-used experts.",
                                  kinds=kinds_using("load_balancing"))
    noise_factor: float = _field(0.0, "Train-time logit noise in [0, 1].", lo=0, hi=1,
                                 kinds=kinds_using("noise_factor"))
    top_p: float | None = _field(None, "Probability mass kept by the threshold strategy; "
                                 "null for the router's default.", gt=0, hi=1,
                                 kinds=kinds_using("top_p"))
    adaptation_rate: float = _field(0.01, "Adaptive threshold learning rate.", gt=0,
                                    kinds=kinds_using("adaptation_rate"))
    estimator_options: Mapping[str, Any] = _field(doc="Extra keyword arguments of the "
                                                  "complexity estimator.",
                                                  factory=lambda: MappingProxyType({}),
                                                  kinds=kinds_using("estimator_options"))
    fault: FaultSpec | None = _field(None, "Injected failures (fault_injection only).",
                                     kinds=kinds_using("fault"))
    # Keys every kind reads.
    model_dir: Path | None = _field(None, "A Hugging Face model directory (config.json + "
                                    "safetensors): kind, sizes, options and tensor names "
                                    "come from it; keys set here override them.")
    model_part: str | None = _field(None, "Which router of the checkpoint, for models with "
                                    "more than one kind (e.g. deepseek_v4: hash | routed); "
                                    "null for the first.")
    batching: BatchingConfig = _field(doc="Top-level batching with this router's overrides "
                                      "merged over it.", factory=BatchingConfig)
    cache_enabled: bool = _field(True, "Cache this router's answers (when cache.enabled).")
    weights: WeightsSpec = _field(doc="Gate weight source.", factory=WeightsSpec)
    source: str = _field("", "Where this spec was written, e.g. 'config.yaml: routers[2]' "
                         "(prefix of error messages).", derived=True)

    def router_config(self) -> RouterConfig:
        """The RouterConfig of a RouterConfig-based kind: D, E and the kind's
        ``config_fields`` (kind table); ``top_k`` is 1 for kinds with no fixed per-token k.

        Dynamic kinds build their own; for them this only carries the checks on
        input_dim and num_experts.
        """
        used = kind_entry(self.kind).config_fields
        return RouterConfig(
            hidden_size=self.input_dim,
            num_experts=self.num_experts,
            routing_method=self.kind,
            **{"top_k": 1, **{name: getattr(self, name) for name in used}},
        )
