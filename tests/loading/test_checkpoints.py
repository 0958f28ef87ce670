"""Router entries from a checkpoint directory: what config.json and the tensor names imply,
what config.yaml overrides, the one-line errors, and ``moe-router describe``.

The checkpoints here are written by hand (config.json + safetensors), so each test names
exactly the fields it relies on; tests/loading/test_checkpoint_parity.py checks real
``save_pretrained`` output of every family against transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from moe_router.cli import main
from moe_router.config import load_config
from moe_router.errors import RouterConfigurationError
from moe_router.loading.checkpoints import router_entry
from moe_router.loading.registry import load_routers

D, E = 16, 8


def _mixtral(tmp_path: Path, layers: tuple[int, ...] = (0, 1, 2), **config: object) -> Path:
    model = tmp_path / "mixtral"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "hidden_size": D, "num_local_experts": E,
        "num_experts_per_tok": 2, "num_hidden_layers": 3, **config}))
    gen = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{i}.block_sparse_moe.gate.weight": torch.randn(E, D, generator=gen)
               for i in layers}, str(model / "model.safetensors"))
    return model


def _config(tmp_path: Path, entry: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"server: {{device: cpu}}\nrouters:\n  - {entry}\n")
    return path


def test_the_entry_comes_from_config_json_and_the_tensor_names(tmp_path: Path):
    entry = router_entry(_mixtral(tmp_path))
    assert entry["kind"] == "top_k" and entry["scoring"] == "softmax"
    assert (entry["num_experts"], entry["top_k"], entry["input_dim"]) == (E, 2, D)
    assert entry["renormalize"] is True and entry["layers"] == 3
    assert entry["weights"]["gate"] == "model.layers.{layer}.block_sparse_moe.gate.weight"
    assert entry["weights"]["layer_offset"] == 0


def test_dense_first_layers_give_the_offset_and_gaps_give_the_layer_list(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert router_entry(_mixtral(tmp_path / "a", layers=(1, 2)))["weights"]["layer_offset"] == 1
    entry = router_entry(_mixtral(tmp_path / "b", layers=(0, 2)))
    assert entry["weights"]["checkpoint_layers"] == [0, 2] and entry["layers"] == 2


def test_a_model_dir_entry_serves_the_checkpoint_gates(tmp_path: Path):
    model = _mixtral(tmp_path)
    config = load_config(_config(tmp_path, f"{{name: m, model_dir: '{model}'}}"), env={})
    router = load_routers(config)["m"].layers[2]
    tensors = load_file(str(model / "model.safetensors"))
    assert torch.equal(router.gate.weight, tensors["model.layers.2.block_sparse_moe.gate.weight"])


def test_keys_written_next_to_model_dir_win(tmp_path: Path):
    model = _mixtral(tmp_path)
    entry = (f"{{name: m, model_dir: '{model}', top_k: 3, kind: grouped_top_k, n_group: 2, "
             "topk_group: 1, weights: {layer_offset: 1}, layers: 2}")
    spec = load_config(_config(tmp_path, entry), env={}).routers[0]
    assert (spec.kind.value, spec.top_k, spec.n_group, spec.layers) == ("grouped_top_k", 3, 2, 2)
    assert spec.weights.layer_offset == 1 and spec.weights.gate.endswith("gate.weight")


def test_random_weights_written_next_to_model_dir_replace_the_checkpoint(tmp_path: Path):
    model = _mixtral(tmp_path)
    entry = f"{{name: m, model_dir: '{model}', weights: {{init: random, seed: 3}}}}"
    spec = load_config(_config(tmp_path, entry), env={}).routers[0]
    assert spec.weights.path is None and spec.weights.seed == 3


@pytest.mark.parametrize(("config_json", "message"), [
    ({"model_type": "llama"}, "routers[0].model_dir: model_type 'llama': not a family this "
     "server maps (supported: afmoe, aria,"),
    ({"model_type": "dbrx", "d_model": D, "ffn_config": {"moe_num_experts": E, "moe_top_k": 2,
      "moe_normalize_expert_weights": 2.0}},
     "routers[0].model_dir: model_type 'dbrx': moe_normalize_expert_weights=2.0 cannot be "
     "expressed: only the L1 normalisation (renormalize) or none"),
    ({"model_type": "deepseek_v2", "hidden_size": D, "n_routed_experts": E,
      "num_experts_per_tok": 2, "topk_method": "noaux_tc"},
     "model_type 'deepseek_v2': topk_method='noaux_tc' cannot be expressed"),
    ({"model_type": "mixtral", "hidden_size": D, "num_experts_per_tok": 2},
     "model_type 'mixtral': config.json has no 'num_local_experts'"),
    ({"model_type": "hunyuan_v1_moe", "hidden_size": D, "num_experts": [8, 16], "moe_topk": 2},
     "model_type 'hunyuan_v1_moe': num_experts [8, 16] is not one integer for every layer"),
])
def test_a_checkpoint_we_cannot_express_fails_in_one_line(tmp_path: Path, config_json, message):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(RouterConfigurationError) as info:
        load_config(_config(tmp_path, f"{{name: m, model_dir: '{model}'}}"), env={})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_missing_gate_or_bias_names_the_layer_and_the_tensor(tmp_path: Path):
    model = tmp_path / "v3"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v3", "hidden_size": D, "n_routed_experts": E,
        "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "num_hidden_layers": 2}))
    save_file({"model.layers.0.mlp.gate.weight": torch.zeros(E, D),
               "model.layers.0.mlp.gate.e_score_correction_bias": torch.zeros(E),
               "model.layers.1.mlp.gate.weight": torch.zeros(E, D)},
              str(model / "model.safetensors"))
    with pytest.raises(RouterConfigurationError, match=r"model_type 'deepseek_v3': layer 1 has "
                       r"model.layers.1.mlp.gate.weight but no 'mlp.gate.e_score_correction_bias'"):
        router_entry(model)
    (model / "config.json").write_text(json.dumps({"model_type": "olmoe", "hidden_size": D,
                                                   "num_experts": E, "num_experts_per_tok": 2}))
    with pytest.raises(RouterConfigurationError, match="model_type 'olmoe': no layer has a gate "
                       "tensor named like 'mlp.gate.weight'") as info:
        (model / "model.safetensors").unlink()
        save_file({"model.layers.0.other.weight": torch.zeros(2)}, str(model / "model.safetensors"))
        router_entry(model)
    assert info.value is not None


def test_an_unknown_part_names_the_parts(tmp_path: Path):
    model = _mixtral(tmp_path)
    with pytest.raises(RouterConfigurationError,
                       match="model_type 'mixtral': no part 'hash'; it has routed"):
        router_entry(model, "hash")


def test_not_a_model_directory(tmp_path: Path):
    with pytest.raises(RouterConfigurationError, match=r"routers\[0\].model_dir: not a directory"):
        load_config(_config(tmp_path, f"{{name: m, model_dir: '{tmp_path / 'none'}'}}"), env={})
    with pytest.raises(RouterConfigurationError, match="not a Hugging Face model directory"):
        load_config(_config(tmp_path, f"{{name: m, model_dir: '{tmp_path}'}}"), env={})


def test_describe_prints_an_entry_that_loads(tmp_path: Path, capsys: pytest.CaptureFixture):
    model = _mixtral(tmp_path)
    assert main(["describe", str(model), "--name", "mix"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    entry = printed["routers"][0]
    assert entry["name"] == "mix" and entry["kind"] == "top_k" and "model_dir" not in entry
    path = tmp_path / "pasted.yaml"
    path.write_text(yaml.safe_dump({"server": {"device": "cpu"}, **printed}))
    assert load_routers(load_config(path, env={}))["mix"].spec.num_experts == E


def test_describe_of_a_bad_directory_says_why_in_one_line(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture):
    assert main(["describe", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-router describe: ") and "no config.json" in err
    assert err.count("\n") == 1
