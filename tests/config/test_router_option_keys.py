"""config.yaml keys of the issue-13 router options: typed, kind-checked, and their
combination errors named by key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_router.config import load_config
from moe_router.errors import RouterConfigurationError

BASE = "{name: r, kind: %s, input_dim: 8, num_experts: 8%s}"


def _load(tmp_path: Path, kind: str, extra: str):
    path = tmp_path / "config.yaml"
    path.write_text("routers:\n  - " + BASE % (kind, extra) + "\n")
    return load_config(path, env={})


def test_the_options_load_typed(tmp_path: Path):
    spec = _load(tmp_path, "top_k", ", scoring: sqrtsoftplus, use_correction_bias: true, "
                 "correction_bias_target: logits, logit_softcap: 30, input_norm: rms, "
                 "per_expert_scale: true").routers[0]
    config = spec.router_config()
    assert config.scoring.value == "sqrtsoftplus" and config.logit_softcap == 30.0
    assert config.correction_bias_target.value == "logits" and config.per_expert_scale


@pytest.mark.parametrize(("kind", "extra", "message"), [
    ("top_k", ", group_mask_fill: zero",
     "routers[0].group_mask_fill: is not used by kind 'top_k' (only by grouped_top_k)"),
    ("top_k", ", logit_softcap: 0", "routers[0].logit_softcap: must be > 0, got 0"),
    ("top_k", ", correction_bias_target: logits",
     "routers[0].correction_bias_target: 'logits' places the e_score_correction_bias; it needs "
     "use_correction_bias: true"),
    ("top_k", ", scored_shared_experts: 2",
     "routers[0].scored_shared_experts: needs per-expert scores"),
    ("hash", "", "routers[0].vocab_size: required for a hash router"),
    ("sparsemixer", ", top_k: 3", "routers[0].top_k: SparseMixer chooses exactly 2"),
    ("moe_router", ", hidden_layers: [4], mlp_layers: [{width: 4}]",
     "routers[0].mlp_layers: give either hidden_layers or mlp_layers, not both"),
    ("moe_router", ", mlp_layers: [{width: 4, activation: swish}]",
     "routers[0].mlp_layers[0].activation: must be one of 'none', 'relu', 'gelu'"),
    ("top_k", ", weights: {init: random, tensors: {input_scale: 'x'}}",
     "routers[0].weights.tensors: is used only with path"),
])
def test_option_errors_name_the_key(tmp_path: Path, kind: str, extra: str, message: str):
    with pytest.raises(RouterConfigurationError) as info:
        _load(tmp_path, kind, extra)
    assert message in str(info.value), str(info.value)


def test_a_checkpoint_router_must_name_every_router_tensor(tmp_path: Path):
    import torch
    from safetensors.torch import save_file

    save_file({"g": torch.zeros(8, 8)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(RouterConfigurationError, match=r"routers\[0\].weights.tensors: has no "
                       r"checkpoint name for input_scale, per_expert_scale"):
        _load(tmp_path, "top_k", ", input_norm: rms, per_expert_scale: true, "
              "weights: {path: w.safetensors, gate: g}")
    with pytest.raises(RouterConfigurationError, match=r"routers\[0\].weights.tensors: bogus: "
                       r"not tensors of kind 'top_k'"):
        _load(tmp_path, "top_k", ", weights: {path: w.safetensors, gate: g, tensors: {bogus: g}}")
