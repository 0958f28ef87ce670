"""The MoE families of transformers we configure from a checkpoint: model_type -> router.

One :class:`Family` per ``model_type`` of ``config.json``; each has one :class:`Part` per
router kind in the model (most one; DeepSeek-V4 has hash and routed layers, Qwen3-Omni a
thinker and a talker). A part names its reference module (the transformers router class
whose answers ours equal, checked by tests/loading/test_checkpoint_parity.py), the gate
tensor's name inside a layer, where the (text) config lives, and a translator from that
config to router keys: ``kind``, ``num_experts``, ``top_k``, the kind's options, ``bias``
(the correction bias tensor's name inside a layer) and ``tensors`` (more router tensors,
router name -> name inside a layer). Which layers are MoE layers, and under which prefix,
comes from the checkpoint's tensor names (:mod:`moe_router.loading.checkpoints`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from moe_router.loading.checkpoint_config import ModelConfig

__all__ = ["Part", "Family", "FAMILIES"]

Translator = Callable[[ModelConfig], dict[str, Any]]


@dataclass(frozen=True)
class Part:
    """One router of a checkpoint.

    name: the ``model_part`` value. reference: the transformers router it equals.
    translate: config -> router keys. gate: the gate weight's name inside a layer
    (alternatives in order). config_path: where the text config is nested.
    prefix_has: keep only tensor prefixes containing this (``thinker.``).
    layer_has / layer_has_wanted: keep only layers that have (or lack) this tensor.
    """

    name: str
    reference: str
    translate: Translator
    gate: tuple[str, ...] = ("mlp.gate.weight",)
    config_path: tuple[str, ...] = ("text_config",)
    prefix_has: str | None = None
    layer_has: str | None = None
    layer_has_wanted: bool = True


@dataclass(frozen=True)
class Family:
    """A model_type's routers (the first part is the default)."""

    parts: tuple[Part, ...]


# ----------------------------------------------------------------------------- helpers
_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts")
_NORM = ("norm_topk_prob", "moe_renormalize")
_SCALE = ("routed_scaling_factor", "route_scale", "router_scaling_factor")


def _experts_k(cfg: ModelConfig) -> dict[str, Any]:
    return {"num_experts": cfg.require_int(*_EXPERTS), "top_k": cfg.require_int(*_TOP_K)}


def _softmax(norm: bool | None = None, **extra: Any) -> Translator:
    """Softmax top-k; ``norm`` fixed (True/False) or read from norm_topk_prob (None)."""

    def translate(cfg: ModelConfig) -> dict[str, Any]:
        renormalize = norm if norm is not None else bool(cfg.get(*_NORM, default=False))
        return {"kind": "top_k", **_experts_k(cfg), "scoring": "softmax",
                "renormalize": renormalize, **extra}

    return translate


def _sigmoid_biased(*, bias: str | None, norm: bool | None = True, scale: bool = True,
                    eps: float | None = None, scoring_key: str | None = None,
                    **extra: Any) -> Translator:
    """Per-expert scores, the correction bias ``bias`` on them, no groups (MiniMax-M2 style)."""

    def translate(cfg: ModelConfig) -> dict[str, Any]:
        scoring = cfg.get(scoring_key, default="sigmoid") if scoring_key else "sigmoid"
        if scoring not in ("sigmoid", "sqrtsoftplus", "softmax"):
            cfg.unsupported(scoring_key or "scoring_func", scoring,
                            "scoring sigmoid, sqrtsoftplus or softmax")
        entry: dict[str, Any] = {"kind": "top_k", **_experts_k(cfg), "scoring": scoring,
                                 "renormalize": norm if norm is not None
                                 else bool(cfg.get(*_NORM, default=False))}
        if bias is not None:
            entry.update(use_correction_bias=True, bias=bias)
        if scale:
            entry["routed_scaling_factor"] = float(cfg.get(*_SCALE, default=1.0))
        if eps is not None:
            entry["renormalize_eps"] = eps
        return {**entry, **extra}

    return translate


def _noaux_tc(*, scale: bool = True, fill: str = "neg_inf", norm_default: bool = True,
              bias: str = "mlp.gate.e_score_correction_bias") -> Translator:
    """DeepSeek-V3's sigmoid + correction bias + top-2-sum groups (``noaux_tc``)."""

    def translate(cfg: ModelConfig) -> dict[str, Any]:
        n_group = cfg.get("n_group", "num_expert_group", default=1)
        entry: dict[str, Any] = {
            "kind": "top_k", **_experts_k(cfg), "scoring": "sigmoid",
            "renormalize": bool(cfg.get(*_NORM, default=norm_default)),
            "routed_scaling_factor": float(cfg.get(*_SCALE, default=1.0)) if scale else 1.0,
            "use_correction_bias": True, "bias": bias,
        }
        if n_group > 1:
            entry.update(kind="grouped_top_k", n_group=n_group,
                         topk_group=cfg.require_int("topk_group"), group_score="top2_sum",
                         group_mask_fill=fill)
        return entry

    return translate


def _deepseek_v2(cfg: ModelConfig) -> dict[str, Any]:
    """V2's softmax with ``greedy`` or ``group_limited_greedy`` (max group, 0.0 fill)."""
    method = cfg.get("topk_method", default="greedy")
    entry: dict[str, Any] = {"kind": "top_k", **_experts_k(cfg), "scoring": "softmax",
                             "renormalize": False,
                             "routed_scaling_factor": float(cfg.get(*_SCALE, default=1.0))}
    if method == "group_limited_greedy":
        entry.update(kind="grouped_top_k", n_group=cfg.require_int("n_group"),
                     topk_group=cfg.require_int("topk_group"), group_score="max",
                     group_mask_fill="zero")
    elif method != "greedy":
        cfg.unsupported("topk_method", method, "transformers' DeepseekV2TopkRouter runs only "
                        "greedy and group_limited_greedy")
    return entry


def _mistral4(norm: bool | None) -> Translator:
    """Mistral 4: softmax, top-2-sum groups with the 0.0 fill, no correction bias."""

    def translate(cfg: ModelConfig) -> dict[str, Any]:
        entry = _softmax(norm)(cfg)
        entry["routed_scaling_factor"] = float(cfg.get(*_SCALE, default=1.0))
        n_group = cfg.get("n_group", default=1)
        if n_group > 1:
            entry.update(kind="grouped_top_k", n_group=n_group,
                         topk_group=cfg.require_int("topk_group"), group_score="top2_sum",
                         group_mask_fill="zero")
        return entry

    return translate


def _axk2(cfg: ModelConfig) -> dict[str, Any]:
    """AXK2: V3's scoring, groups only when n_group is set, dropped groups filled 0.0."""
    entry = _noaux_tc(fill="zero")(cfg)
    if cfg.get("n_group") is None:
        entry.update(kind="top_k")
        for key in ("n_group", "topk_group", "group_score", "group_mask_fill"):
            entry.pop(key, None)
    return entry


def _dbrx(cfg: ModelConfig) -> dict[str, Any]:
    ffn = ModelConfig(cfg.model_type, cfg.get("ffn_config", default={}))
    p = ffn.get("moe_normalize_expert_weights")
    if p not in (None, 1, 1.0):
        ffn.unsupported("moe_normalize_expert_weights", p, "only the L1 normalisation "
                        "(renormalize) or none")
    return {"kind": "top_k", "num_experts": ffn.require_int("moe_num_experts"),
            "top_k": ffn.require_int("moe_top_k"), "scoring": "softmax",
            "renormalize": p is not None}


def _hunyuan(cfg: ModelConfig) -> dict[str, Any]:
    return {"kind": "top_k", "num_experts": cfg.require_int("num_experts"),
            "top_k": cfg.require_int("moe_topk"), "scoring": "softmax", "renormalize": True}


def _cohere2(cfg: ModelConfig) -> dict[str, Any]:
    selection = cfg.get("expert_selection_fn", default="softmax")
    if selection == "softmax":
        return _softmax(True)(cfg)
    if selection == "sigmoid":
        return {**_experts_k(cfg), "kind": "top_k", "scoring": "sigmoid",
                "renormalize": bool(cfg.get("norm_topk_prob", default=False))}
    cfg.unsupported("expert_selection_fn", selection, "softmax or sigmoid")


def _gpt_oss(scale_by_k: bool) -> Translator:
    """Softmax over the top-k logits (= renormalised softmax), a gate bias; /k (privacy filter)."""

    def translate(cfg: ModelConfig) -> dict[str, Any]:
        entry = {**_softmax(True)(cfg), "gate_bias": True,
                 "tensors": {"gate.bias": "mlp.router.bias"}}
        if scale_by_k:
            entry["routed_scaling_factor"] = 1.0 / entry["top_k"]
        return entry

    return translate


def _longcat(cfg: ModelConfig) -> dict[str, Any]:
    """Softmax over routed + zero experts (ids >= n_routed_experts are Longcat's identity
    experts), the correction bias on the scores, no renormalisation."""
    entry: dict[str, Any] = {
        "kind": "top_k", "scoring": "softmax", "renormalize": False,
        "num_experts": cfg.require_int("n_routed_experts") + int(cfg.get("zero_expert_num",
                                                                          default=0)),
        "top_k": cfg.require_int("moe_topk", "num_experts_per_tok"),
        "routed_scaling_factor": float(cfg.get(*_SCALE, default=1.0)),
        "use_correction_bias": True, "bias": "mlp.router.e_score_correction_bias",
    }
    if cfg.get("router_bias", default=False):
        entry.update(gate_bias=True, tensors={"gate.bias": "mlp.router.classifier.bias"})
    return entry


def _gemma4(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.get("enable_moe_block", default=True):
        cfg.fail("enable_moe_block is false: the model has no MoE layer")
    return {**_softmax(True)(cfg), "input_norm": "rms",
            "input_norm_eps": float(cfg.get("rms_norm_eps", default=1e-6)),
            "per_expert_scale": True,
            "tensors": {"input_scale": "router.scale",
                        "per_expert_scale": "router.per_expert_scale"}}


def _laguna(cfg: ModelConfig) -> dict[str, Any]:
    entry = _sigmoid_biased(bias="mlp.experts.e_score_correction_bias", scale=False,
                            eps=0.0)(cfg)
    cap = float(cfg.get("moe_router_logit_softcapping", default=0.0))
    if cap > 0:
        entry["logit_softcap"] = cap
    return entry


def _lfm2(cfg: ModelConfig) -> dict[str, Any]:
    entry = _sigmoid_biased(bias=None, norm=None, eps=1e-6)(cfg)
    if cfg.get("use_expert_bias", default=False):
        entry.update(use_correction_bias=True, bias="feed_forward.expert_bias")
    return entry


def _muse_spark(cfg: ModelConfig) -> dict[str, Any]:
    return {**_sigmoid_biased(bias="mlp.gate.e_score_correction_bias", eps=1e-15)(cfg),
            "logit_multiplier": float(cfg.require("output_multiplier"))}


def _kolibri(cfg: ModelConfig) -> dict[str, Any]:
    return {**_sigmoid_biased(bias="moe.router.expert_bias", norm=None,
                              scale=False, eps=0.0)(cfg), "correction_bias_target": "logits"}


def _inkling(cfg: ModelConfig) -> dict[str, Any]:
    routed, shared = cfg.require_int("n_routed_experts"), cfg.require_int("n_shared_experts")
    return {"kind": "top_k", "num_experts": routed + shared, "top_k": cfg.require_int(*_TOP_K),
            "scoring": "sigmoid", "renormalize": True, "scored_shared_experts": shared,
            "routed_scaling_factor": float(cfg.get("route_scale", default=1.0)),
            "learned_weight_scale": True, "use_correction_bias": True, "bias": "mlp.gate.bias",
            "tensors": {"weight_scale": "mlp.gate.global_scale"}}


def _ernie(cfg: ModelConfig) -> dict[str, Any]:
    return {**_softmax(True)(cfg), "use_correction_bias": True,
            "renormalize_eps": float(cfg.get("moe_norm_min", default=1e-12)),
            "bias": "mlp.moe_statics.e_score_correction_bias"}


def _phimoe(cfg: ModelConfig) -> dict[str, Any]:
    k = cfg.require_int(*_TOP_K)
    if k != 2:
        cfg.unsupported("num_experts_per_tok", k, "SparseMixer routes exactly 2 experts")
    return {"kind": "sparsemixer", "num_experts": cfg.require_int(*_EXPERTS), "top_k": 2,
            "sparsemixer_eps": float(cfg.get("router_jitter_noise", default=0.01))}


def _deepseek_v4_hash(cfg: ModelConfig) -> dict[str, Any]:
    entry = _sigmoid_biased(bias=None, scoring_key="scoring_func")(cfg)
    entry.update(kind="hash", vocab_size=cfg.require_int("vocab_size"),
                 tensors={"token_experts": "ffn.gate.tid2eid"})
    return entry


def _part(reference: str, translate: Translator, gate: str | tuple[str, ...] = "mlp.gate.weight",
          name: str = "routed", **options: Any) -> Family:
    gates = (gate,) if isinstance(gate, str) else gate
    return Family((Part(name, reference, translate, gates, **options),))


_V3 = _noaux_tc()
_GRANITE_GATE = ("block_sparse_moe.router.layer.weight", "block_sparse_moe.router.weight")

FAMILIES: Mapping[str, Family] = MappingProxyType({
    # Softmax top-k (renormalised or as norm_topk_prob says).
    "mixtral": _part("MixtralTopKRouter", _softmax(True),
                     ("block_sparse_moe.gate.weight", "mlp.gate.weight")),
    "minimax": _part("MiniMaxTopKRouter", _softmax(True),
                     ("block_sparse_moe.gate.weight", "mlp.gate.weight")),
    "qwen2_moe": _part("Qwen2MoeTopKRouter", _softmax()),
    "qwen3_moe": _part("Qwen3MoeTopKRouter", _softmax()),
    "qwen3_next": _part("Qwen3NextTopKRouter", _softmax()),
    "qwen3_5_moe": _part("Qwen3_5MoeTopKRouter", _softmax(True)),
    "qwen3_vl_moe": _part("Qwen3VLMoeTextTopKRouter", _softmax(True)),
    "qwen4_exp": _part("Qwen4ExpTextTopKRouter", _softmax()),
    "qwen3_omni_moe": _part("Qwen3OmniMoeThinkerTextTopKRouter", _softmax(), name="thinker",
                            config_path=("thinker_config", "text_config"),
                            prefix_has="thinker."),
    "olmoe": _part("OlmoeTopKRouter", _softmax()),
    "flex_olmo": _part("FlexOlmoTopKRouter", _softmax()),
    "mellum": _part("MellumTopKRouter", _softmax()),
    "lara_mini": _part("LaraMiniTopKRouter", _softmax()),
    "hunyuan_v1_moe": _part("HunYuanMoEV1Gate", _hunyuan, "mlp.gate.wg.weight"),
    "jamba": _part("JambaTopKRouter", _softmax(False), "feed_forward.router.weight"),
    "dbrx": _part("DbrxRouter + DbrxFFN.route_tokens_to_experts", _dbrx,
                  "ffn.router.layer.weight"),
    "gpt_oss": _part("GptOssTopKRouter", _gpt_oss(False), "mlp.router.weight"),
    "openai_privacy_filter": _part("OpenAIPrivacyFilterTopKRouter", _gpt_oss(True),
                                   "mlp.router.weight"),
    "granitemoe": _part("GraniteMoeTopKRouter", _softmax(True),
                        _GRANITE_GATE),
    "granitemoeshared": _part("GraniteMoeSharedTopKRouter", _softmax(True),
                              _GRANITE_GATE),
    "granitemoehybrid": _part("GraniteMoeHybridTopKRouter", _softmax(True),
                              _GRANITE_GATE),
    "granitemoe_swa": _part("GraniteMoeSWATopKRouter", _softmax(True),
                            _GRANITE_GATE),
    "jetmoe": _part("JetMoeTopKGating", _softmax(True), "mlp.router.layer.weight"),
    "aria": _part("AriaTextTopKRouter", _softmax(True), "mlp.router.weight"),
    "cohere2_moe": _part("Cohere2MoeTopKRouter", _cohere2),
    "gemma4": _part("Gemma4TextRouter", _gemma4, "router.proj.weight"),
    "diffusion_gemma": _part("DiffusionGemmaTextRouter", _gemma4, "router.proj.weight"),
    "ernie4_5_moe": _part("Ernie4_5_MoeTopKRouter", _ernie),
    "longcat_flash": _part("LongcatFlashTopkRouter", _longcat, "mlp.router.classifier.weight"),
    # Sigmoid (or another per-expert score) with or without a correction bias, no groups.
    "llama4": _part("Llama4Router", _sigmoid_biased(bias=None, norm=False, scale=False),
                    "feed_forward.router.weight"),
    "flint": _part("FlintTopKRouter", _sigmoid_biased(bias=None, norm=None, scale=False)),
    "afmoe": _part("AfmoeTokenChoiceRouter",
                   _sigmoid_biased(bias="mlp.expert_bias"), "mlp.router.gate.weight"),
    "hy_v3": _part("HYV3TopKRouter", _sigmoid_biased(bias="mlp.expert_bias"),
                   "mlp.router.gate.weight"),
    "minimax_m2": _part("MiniMaxM2TopKRouter", _sigmoid_biased(
        bias="block_sparse_moe.e_score_correction_bias", scale=False, eps=0.0),
        "block_sparse_moe.gate.weight"),
    "minimax_m3_vl": _part("MiniMaxM3VLTopKRouter", _sigmoid_biased(
        bias="block_sparse_moe.e_score_correction_bias", scale=False, eps=0.0),
        "block_sparse_moe.gate.weight"),
    "step3p7": _part("Step3p7TopKRouter", _sigmoid_biased(
        bias="moe.router_bias", scale=False, eps=0.0), "moe.gate.weight"),
    "inkling2": _part("Inkling2TopKRouter", _sigmoid_biased(
        bias="mlp.gate.bias", scoring_key="scoring_func")),
    "inkling2_loop": _part("Inkling2LoopTopKRouter", _sigmoid_biased(
        bias="mlp.gate.bias", scoring_key="scoring_func")),
    "inkling_mm_model": _part("InklingTopkRouter", _inkling),
    "laguna": _part("LagunaTopKRouter", _laguna),
    "lfm2_moe": _part("Lfm2MoeTopKRouter", _lfm2, "feed_forward.gate.weight"),
    "muse_spark": _part("MuseSparkTopkRouter", _muse_spark),
    "kolibri1": _part("Kolibri1TopKRouter", _kolibri),
    "phimoe": _part("PhimoeTopKRouter (sparsemixer, eval)", _phimoe,
                    ("block_sparse_moe.gate.weight", "mlp.router.weight")),
    "deepseek_v4": Family((
        Part("routed", "DeepseekV4TopKRouter", _sigmoid_biased(
            bias="ffn.gate.bias", scoring_key="scoring_func"),
            ("ffn.gate.weight",), layer_has="ffn.gate.tid2eid", layer_has_wanted=False),
        Part("hash", "DeepseekV4HashRouter", _deepseek_v4_hash, ("ffn.gate.weight",),
             layer_has="ffn.gate.tid2eid"),
    )),
    # DeepSeek-V2's softmax routing (greedy or group-limited greedy).
    "deepseek_v2": _part("DeepseekV2TopkRouter", _deepseek_v2),
    "deepseek_ocr2": _part("DeepseekOcr2TextTopkRouter", _deepseek_v2),
    "unlimited_ocr": _part("UnlimitedOcrTextTopkRouter", _deepseek_v2),
    "mistral4": _part("Mistral4TopkRouter", _mistral4(None)),
    "mistral_large4": _part("MistralLarge4TextTopkRouter", _mistral4(True),
                            ("gate.weight", "mlp.gate.weight")),
    # DeepSeek-V3's noaux_tc: sigmoid + correction bias + top-2-sum groups.
    "deepseek_v3": _part("DeepseekV3TopkRouter", _V3),
    "deepseek_v32": _part("DeepseekV32TopkRouter", _V3),
    "glm4_moe": _part("Glm4MoeTopkRouter", _V3),
    "glm4_moe_lite": _part("Glm4MoeLiteTopkRouter", _V3),
    "glm4v_moe": _part("Glm4vMoeTextTopkRouter", _V3),
    "glm5_next": _part("Glm5NextTextTopkRouter", _V3),
    "glm_moe_dsa": _part("GlmMoeDsaTopkRouter", _V3),
    "dots1": _part("Dots1TopkRouter", _noaux_tc(norm_default=False)),
    "dots3_note": _part("Dots3NoteTextTopkRouter", _V3),
    "exaone_moe": _part("ExaoneMoeTopkRouter", _noaux_tc(bias="mlp.e_score_correction_bias")),
    "kimi_linear": _part("KimiLinearTopkRouter", _noaux_tc(
        bias="block_sparse_moe.gate.e_score_correction_bias"), "block_sparse_moe.gate.weight"),
    "mimo_v2_flash": _part("MiMoV2FlashTopkRouter", _V3),
    "nemotron_h": _part("NemotronHTopkRouter",
                        _noaux_tc(bias="mixer.gate.e_score_correction_bias"), "mixer.gate.weight"),
    "solar_open": _part("SolarOpenTopkRouter", _V3),
    "hy_v4": _part("HYV4TopkRouter", _V3),
    "hy_v4_vl": _part("HYV4VLTopkRouter", _V3),
    "axk1": _part("AXK1TopkRouter", _V3),
    "axk2": _part("AXK2TopkRouter", _axk2),
    "bailing_hybrid": _part("BailingHybridTopkRouter",
                            _noaux_tc(bias="mlp.gate.expert_bias")),
    "beam": _part("BeamTopKRouter (routed_scaling_factor is applied by BeamMoE)",
                  _noaux_tc(scale=False)),
})
"""model_type -> its routers. A test keeps this, the README table and the parity tests
in step."""
