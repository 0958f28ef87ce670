"""Tiny random Hugging Face checkpoints of the MoE families in transformers, for parity tests.

``build_tiny_model(model_type)`` makes the model a real checkpoint of that family holds
(``XForCausalLM`` or ``XForConditionalGeneration``), with small widths and few layers
but the family's own expert count, top-k, groups and scaling (its config defaults, or
the released model's where the default is none), and every router tensor (gate,
correction bias, scales, token table) drawn at random with a spread that makes routing
non-trivial. ``save_pretrained`` writes it as the Hub does (transformers 5 saves in the
checkpoint layout, e.g. Mixtral's ``block_sparse_moe``). ``router_modules`` finds the
transformers router of each decoder layer, the reference our answers must equal.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["TINY", "MODEL_OVERRIDES", "SUB_OVERRIDES", "tiny_config", "build_tiny_model",
           "router_modules"]

# Widths shared by every family's text model; keys a family does not have are skipped.
TINY: Mapping[str, Any] = {
    "hidden_size": 32, "intermediate_size": 32, "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 16, "vocab_size": 96, "max_position_embeddings": 256, "q_lora_rank": 16,
    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "num_hidden_layers": 4, "expert_ffn_hidden_size": 16, "ffn_hidden_size": 32,
    "moe_hidden_size": 16, "router_hidden_size": 16, "shared_intermediate_size": 16,
    "dense_intermediate_size": 32, "share_expert_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_head_dim": 8, "linear_num_heads": 2, "index_n_heads": 2, "index_head_dim": 8,
    "mamba_n_heads": 4, "mamba_head_dim": 8, "mamba_d_state": 8, "ssm_state_size": 8,
    "global_head_dim": 16, "num_global_key_value_heads": 1, "o_lora_rank": 16,
    "sliding_window": 16, "pad_token_id": 0, "num_layers": 4,
}
TINY_VISION: Mapping[str, Any] = {
    "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "depth": 1,
    "num_attention_heads": 2, "num_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
    "out_hidden_size": 32, "projection_dim": 32, "output_dim": 32,
}

#: Per model_type: config keys (of the text config where it is nested) the defaults do
#: not set usefully for a test (no MoE block, no expert count) or that must be small.
MODEL_OVERRIDES: Mapping[str, Mapping[str, Any]] = {
    "gemma4": {"enable_moe_block": True, "num_experts": 128, "top_k_experts": 8},
    "diffusion_gemma": {"enable_moe_block": True, "num_experts": 128, "top_k_experts": 8},
    "dots1": {"n_routed_experts": 128, "num_experts_per_tok": 6, "n_shared_experts": 2},
    "deepseek_v2": {"num_experts_per_tok": 6, "n_group": 8, "topk_group": 3,
                    "topk_method": "group_limited_greedy", "routed_scaling_factor": 16.0,
                    "n_routed_experts": 160},
    "hunyuan_v1_moe": {"num_experts": 64, "moe_topk": 8},
    "laguna": {"moe_router_logit_softcapping": 30.0},
    "dots3_note": {"num_key_value_heads": 2},
    "hy_v4_vl": {"qk_rope_head_dim": 64},
    "glm5_next": {"num_key_value_heads": 2, "qk_rope_head_dim": 0},
    "qwen4_exp": {"layer_types": ["linear_attention"] * 4},
    "lfm2_moe": {"use_expert_bias": True, "num_dense_layers": 1,
                 "layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "deepseek_ocr2": {"num_experts_per_tok": 6,
                      "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]},
    "inkling2": {"vocab_size": 201024},
    "inkling2_loop": {"vocab_size": 201024},
    "dbrx": {"d_model": 32, "n_heads": 2, "n_layers": 4, "max_seq_len": 64,
             "ffn_config": {"ffn_hidden_size": 16, "moe_num_experts": 16, "moe_top_k": 4},
             "attn_config": {"kv_n_heads": 1}},
}


#: Per model_type: keys of other sub-configs (vision, audio) that must agree with TINY.
SUB_OVERRIDES: Mapping[str, Mapping[str, Mapping[str, Any]]] = {
    "inkling2": {"vision_config": {"text_hidden_size": 32}},
    "inkling2_loop": {"vision_config": {"text_hidden_size": 32}},
    "dots3_note": {"vision_config": {"adapter_in_dim": 16, "adapter_out_dim": 32},
                   "audio_config": {"adapter_input_size": 16, "adapter_out_dim": 32}},
    "inkling_mm_model": {"audio_config": {"text_hidden_size": 32},
                         "vision_config": {"text_hidden_size": 32, "n_layers": 1}},
    "muse_spark": {"audio_config": {"num_hidden_layers": 4}},
    "qwen3_omni_moe": {"audio_config": {"encoder_layers": 1, "encoder_attention_heads": 2,
                                        "encoder_ffn_dim": 16, "d_model": 16, "output_dim": 32,
                                        "downsample_hidden_size": 8}},
}


#: Fixes applied to a config after it is built (transformers 5.24's DBRX attention reads an
#: ``attn_config.rope_theta`` its own config no longer has).
CONFIG_FIXES: Mapping[str, Any] = {
    "dbrx": lambda config: setattr(config.attn_config, "rope_theta", 500000.0),
    # The talker (speech) cannot be built from its default config in 5.24; the thinker can.
    "qwen3_omni_moe": lambda config: setattr(config, "enable_audio_output", False),
}


def _shrink(defaults: Mapping[str, Any], sizes: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in sizes.items() if key in defaults}


def _tiny(defaults: Mapping[str, Any], text: bool, model_type: str, name: str) -> dict[str, Any]:
    """Shrunk kwargs of one (sub-)config, recursing into nested ``*_config`` dicts."""
    subs = [k for k, v in defaults.items() if k.endswith("_config") and isinstance(v, dict)]
    container = "text_config" in subs
    out = {} if container else _shrink(defaults, TINY if text else TINY_VISION)
    if text and not container:
        out.update(MODEL_OVERRIDES.get(model_type, {}))
    for sub in subs:
        out[sub] = _tiny(defaults[sub], sub == "text_config", model_type, sub)
    if not text:
        out.update(SUB_OVERRIDES.get(model_type, {}).get(name, {}))
    return out


def tiny_config(model_type: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The family's config with TINY widths (its MoE shape kept), text config nested or not;
    ``overrides`` are more keys of the text config."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    defaults = cls().to_dict()
    kwargs = _tiny(defaults, True, model_type, "")
    if overrides:
        text = kwargs.get("text_config", kwargs)
        text.update(overrides)
    config = cls(**kwargs)
    if model_type in CONFIG_FIXES:
        CONFIG_FIXES[model_type](config)
    return config


def _model_class(model_type: str, nested_text: bool) -> Any:
    import transformers
    from transformers.models.auto import modeling_auto

    mappings = ["MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "MODEL_MAPPING_NAMES"]
    if nested_text:  # a multimodal checkpoint: the class that holds the whole model
        mappings = mappings[1:3] + mappings[:1] + mappings[3:]
    for mapping in mappings:
        names = getattr(modeling_auto, mapping, {})
        if model_type in names:
            return getattr(transformers, names[model_type])
    raise KeyError(f"no model class for {model_type!r}")


#: Internal (transformers) names of router tensors that get random values.
_ROUTER_TENSOR = re.compile(
    r"\.(mlp|feed_forward|block_sparse_moe|mixer|ffn)\.(gate|router)(\.(gate|classifier|layer|wg|proj))?"
    r"\.(weight|bias)$"
    r"|\.(e_score_correction_bias|expert_bias|per_expert_scale|global_scale|tid2eid)$"
    r"|\.router\.scale$"
)


def _randomize_router_tensors(model: torch.nn.Module, seed: int) -> None:
    """Router tensors drawn so routing is decided (gate N(0, 1): logits of spread ~sqrt(D))."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if "experts." in name or not _ROUTER_TENSOR.search(name):
                continue
            if name.endswith("tid2eid"):
                num_experts = _experts_of(model, name)
                tensor.copy_(torch.randint(0, num_experts, tensor.shape, generator=gen))
            elif name.endswith(("scale", "per_expert_scale", "global_scale")):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif name.endswith(("e_score_correction_bias", "expert_bias")) or name.endswith(
                    ".bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) / tensor.shape[-1] ** 0.5
                             * 3.0)


def _experts_of(model: torch.nn.Module, tid2eid_name: str) -> int:
    router = model.get_submodule(tid2eid_name.rsplit(".", 1)[0])
    return int(router.num_experts)


def build_tiny_model(model_type: str, seed: int = 0,
                     overrides: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """A tiny random model of ``model_type`` in eval mode, router tensors randomised."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, overrides)
    model = _model_class(model_type, hasattr(config, "text_config"))(config)
    _randomize_router_tensors(model, seed + 1)
    return model.eval()


def router_modules(model: torch.nn.Module, class_name: str) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> the module of class ``class_name`` in that layer (the first,
    in module order, under a language-model prefix)."""
    found: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if type(module).__name__ != class_name:
            continue
        if any(t in name for t in ("vision", "visual", "audio", "mtp")):
            continue
        match = re.search(r"(?:layers|blocks)\.(\d+)\.", name + ".")
        if match:
            found.setdefault(int(match[1]), module)
    return found
