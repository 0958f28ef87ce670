"""Gate weights from real safetensors files: single file, sharded index, and every failure."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moe_router.config import WeightsSpec, load_config
from moe_router.errors import RouterConfigurationError
from moe_router.loading.registry import load_routers
from moe_router.loading.weights import apply_weights, load_gate_tensors, locate_gate_tensors
from moe_router.routing.router_config import RouterConfig
from moe_router.routing.topk import TopKRouter

D, E = 16, 8
MIXTRAL = "model.layers.{layer}.block_sparse_moe.gate.weight"
DEEPSEEK = "model.layers.{layer}.mlp.gate.weight"
DEEPSEEK_BIAS = "model.layers.{layer}.mlp.gate.e_score_correction_bias"


def gate_tensors(count: int, seed: int = 0, rows: int = E) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, D, generator=generator) / D**0.5 for _ in range(count)]


def hidden(tokens: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(tokens, D, generator=torch.Generator().manual_seed(seed))


def write_config(tmp_path: Path, router: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("routers:\n" + textwrap.indent(textwrap.dedent(router), "  "))
    return path


def load(tmp_path: Path, router: str):  # type: ignore[no-untyped-def]
    config = load_config(write_config(tmp_path, router), env={})
    return load_routers(config)[config.routers[0].name]


def top2_reference(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's gate by hand: softmax over experts, top-2, renormalised."""
    probs = torch.softmax(x.double() @ weight.double().T, dim=-1)
    values, indices = torch.topk(probs, 2, dim=-1)
    return indices, values / values.sum(dim=-1, keepdim=True)


def test_single_file_routes_with_exactly_the_checkpoint_weights(tmp_path: Path) -> None:
    weights = gate_tensors(3)
    save_file({MIXTRAL.format(layer=i): w for i, w in enumerate(weights)},
              tmp_path / "model.safetensors")
    hosted = load(tmp_path, f"""
        - name: mixtral
          kind: top_k
          input_dim: {D}
          num_experts: {E}
          top_k: 2
          layers: 3
          weights: {{path: model.safetensors, gate: "{MIXTRAL}"}}
    """)
    x = hidden()
    for layer, weight in enumerate(weights):
        router = hosted.router(layer)
        torch.testing.assert_close(router.gate.weight, weight, rtol=0, atol=0)
        out = router(x)
        indices, combine = top2_reference(x, weight)
        assert torch.equal(out.expert_indices.long(), indices)
        torch.testing.assert_close(out.expert_weights, combine.float())
    assert len(set(hosted.versions)) == 3


def test_layer_offset_skips_the_dense_layers(tmp_path: Path) -> None:
    weights = gate_tensors(5, seed=3)
    save_file({DEEPSEEK.format(layer=i): w for i, w in enumerate(weights)},
              tmp_path / "model.safetensors")
    hosted = load(tmp_path, f"""
        - {{name: r, kind: top_k, input_dim: {D}, num_experts: {E}, layers: 2,
           weights: {{path: model.safetensors, gate: "{DEEPSEEK}", layer_offset: 3}}}}
    """)
    torch.testing.assert_close(hosted.router(0).gate.weight, weights[3], rtol=0, atol=0)
    torch.testing.assert_close(hosted.router(1).gate.weight, weights[4], rtol=0, atol=0)


def write_sharded(tmp_path: Path, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> Path:
    """One layer per shard, plus an index entry for a third shard that does not exist."""
    weight_map = {}
    for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
        shard = f"model-0000{layer + 1}-of-00003.safetensors"
        tensors = {DEEPSEEK.format(layer=layer): w, DEEPSEEK_BIAS.format(layer=layer): b}
        save_file(tensors, tmp_path / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
    weight_map["lm_head.weight"] = "model-00003-of-00003.safetensors"  # never needed
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


GROUPED = f"""
    - name: deepseek
      kind: grouped_top_k
      input_dim: {D}
      num_experts: {E}
      top_k: 4
      scoring: sigmoid
      n_group: 4
      topk_group: 2
      group_score: top2_sum
      use_correction_bias: true
      routed_scaling_factor: 2.5
      layers: 2
      weights:
        path: model.safetensors.index.json
        gate: "{DEEPSEEK}"
        bias: "{DEEPSEEK_BIAS}"
"""


def test_sharded_index_loads_each_layer_from_its_shard_with_bias(tmp_path: Path) -> None:
    weights = gate_tensors(2, seed=5)
    # The bias lifts experts 0-3 (groups 0 and 1) far above the rest in layer 0 and
    # experts 4-7 in layer 1, so the selection is decided by the loaded bias alone.
    lifted = torch.tensor([10.0] * 4 + [0.0] * 4)
    biases = [lifted, lifted.flip(0)]
    write_sharded(tmp_path, weights, biases)
    hosted = load(tmp_path, GROUPED)
    x = hidden(seed=7)
    for layer in range(2):
        router = hosted.router(layer)
        torch.testing.assert_close(router.gate.weight, weights[layer], rtol=0, atol=0)
        torch.testing.assert_close(router.e_score_correction_bias, biases[layer], rtol=0, atol=0)
        chosen = torch.arange(4) + 4 * layer
        out = router(x)
        assert torch.equal(out.expert_indices.sort(dim=-1).values.long(),
                           chosen.expand(x.shape[0], 4))
        scores = torch.sigmoid(x.double() @ weights[layer].double().T)
        expected = scores.gather(1, out.expert_indices.long())
        expected = 2.5 * expected / expected.sum(dim=-1, keepdim=True)
        torch.testing.assert_close(out.expert_weights, expected.float())


def test_load_gate_tensors_reads_the_named_tensors(tmp_path: Path) -> None:
    weights, biases = gate_tensors(2, seed=9), [torch.randn(E), torch.randn(E)]
    index = write_sharded(tmp_path, weights, biases)
    spec = WeightsSpec(init=None, path=index, gate=DEEPSEEK, bias=DEEPSEEK_BIAS)
    gate, bias = load_gate_tensors(spec, 1)
    assert torch.equal(gate, weights[1]) and bias is not None and torch.equal(bias, biases[1])
    where_gate, where_bias = locate_gate_tensors(spec, 1)
    assert str(where_gate) == "model.layers.1.mlp.gate.weight in model-00002-of-00003.safetensors"
    assert where_bias is not None and where_bias.file == tmp_path / where_gate.file.name


def test_bfloat16_checkpoint_is_widened_exactly(tmp_path: Path) -> None:
    weight = gate_tensors(1, seed=11)[0].to(torch.bfloat16)
    save_file({MIXTRAL.format(layer=0): weight}, tmp_path / "model.safetensors")
    hosted = load(tmp_path, f"""
        - {{name: r, kind: top_k, input_dim: {D}, num_experts: {E},
           weights: {{path: model.safetensors, gate: "{MIXTRAL}"}}}}
    """)
    assert hosted.router(0).gate.weight.dtype == torch.float32
    assert torch.equal(hosted.router(0).gate.weight, weight.float())


def test_soft_moe_gate_has_a_row_per_slot(tmp_path: Path) -> None:
    (weight,) = gate_tensors(1, rows=E * 2)
    save_file({"gate": weight}, tmp_path / "soft.safetensors")
    hosted = load(tmp_path, f"""
        - {{name: s, kind: soft_moe, input_dim: {D}, num_experts: {E}, slots_per_expert: 2,
           weights: {{path: soft.safetensors, gate: gate}}}}
    """)
    assert torch.equal(hosted.router(0).gate.weight, weight)


# --------------------------------------------------------------------------- failures
def expect_error(tmp_path: Path, router: str) -> str:
    with pytest.raises(RouterConfigurationError) as info:
        load(tmp_path, router)
    return str(info.value)


ONE_LAYER = f"""
    - {{name: r, kind: top_k, input_dim: {D}, num_experts: {E},
       weights: {{path: %s, gate: "{MIXTRAL}"}}}}
"""


def test_wrong_shape_names_tensor_file_and_shapes(tmp_path: Path) -> None:
    save_file({MIXTRAL.format(layer=0): torch.zeros(4, D)}, tmp_path / "model.safetensors")
    message = expect_error(tmp_path, ONE_LAYER % "model.safetensors")
    assert message == (
        f"{tmp_path / 'config.yaml'}: routers[0].weights: model.layers.0.block_sparse_moe.gate."
        f"weight in model.safetensors has shape [4, {D}], expected [{E}, {D}] "
        "(num_experts, input_dim)"
    )


def test_wrong_shape_in_a_shard_names_the_shard(tmp_path: Path) -> None:
    write_sharded(tmp_path, [torch.zeros(E, D), torch.zeros(E, D + 1)], [torch.zeros(E)] * 2)
    message = expect_error(tmp_path, GROUPED)
    assert (f"model.layers.1.mlp.gate.weight in model-00002-of-00003.safetensors has shape "
            f"[{E}, {D + 1}], expected [{E}, {D}] (num_experts, input_dim)") in message


def test_wrong_bias_shape_is_named(tmp_path: Path) -> None:
    write_sharded(tmp_path, [torch.zeros(E, D)] * 2, [torch.zeros(E), torch.zeros(E - 1)])
    message = expect_error(tmp_path, GROUPED)
    assert (f"model.layers.1.mlp.gate.e_score_correction_bias in "
            f"model-00002-of-00003.safetensors has shape [{E - 1}], expected [{E}]") in message


def test_missing_tensor_names_tensor_file_and_closest(tmp_path: Path) -> None:
    save_file({"model.layers.0.block_sparse_moe.gate.weights": torch.zeros(E, D)},
              tmp_path / "model.safetensors")
    message = expect_error(tmp_path, ONE_LAYER % "model.safetensors")
    assert "routers[0].weights: model.layers.0.block_sparse_moe.gate.weight is not in " in message
    assert str(tmp_path / "model.safetensors") in message
    assert "closest: model.layers.0.block_sparse_moe.gate.weights" in message


def test_tensor_missing_from_the_index(tmp_path: Path) -> None:
    write_sharded(tmp_path, [torch.zeros(E, D)] * 2, [torch.zeros(E)] * 2)
    router = GROUPED.replace("layers: 2", "layers: 3")
    message = expect_error(tmp_path, router)
    assert "model.layers.2.mlp.gate.weight is not in the weight_map of " in message
    assert "model.safetensors.index.json" in message


def test_missing_shard_is_named(tmp_path: Path) -> None:
    write_sharded(tmp_path, [torch.zeros(E, D)] * 2, [torch.zeros(E)] * 2)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    message = expect_error(tmp_path, GROUPED)
    assert "model.layers.1.mlp.gate.weight: shard " in message
    assert "model-00002-of-00003.safetensors does not exist" in message


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    message = expect_error(tmp_path, ONE_LAYER % "model.safetensors")
    assert "model.safetensors: not a readable safetensors file" in message


def test_malformed_index_is_named(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    message = expect_error(tmp_path, ONE_LAYER % "model.safetensors.index.json")
    assert "model.safetensors.index.json: not a safetensors index" in message


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    weight = torch.zeros(E, D)
    weight[2, 3] = float("nan")
    save_file({MIXTRAL.format(layer=0): weight}, tmp_path / "model.safetensors")
    message = expect_error(tmp_path, ONE_LAYER % "model.safetensors")
    assert "in model.safetensors contains NaN or infinite values" in message


def test_checkpoint_deleted_after_config_load_is_named(tmp_path: Path) -> None:
    save_file({MIXTRAL.format(layer=0): torch.zeros(E, D)}, tmp_path / "model.safetensors")
    config = load_config(write_config(tmp_path, ONE_LAYER % "model.safetensors"), env={})
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(RouterConfigurationError, match="checkpoint not found: .*model.safetensors"):
        load_routers(config)


def test_apply_weights_checks_the_router() -> None:
    router = TopKRouter(RouterConfig(hidden_size=D, num_experts=E))
    with pytest.raises(RouterConfigurationError,
                       match="e_score_correction_bias: TopKRouter has no e_score_correction_bias"):
        apply_weights(router, torch.zeros(E, D), torch.zeros(E))
    with pytest.raises(RouterConfigurationError, match=r"has dtype torch.int64, expected floating"):
        apply_weights(router, torch.zeros(E, D, dtype=torch.int64), None)
    weight = gate_tensors(1)[0]
    apply_weights(router, weight, None)
    assert torch.equal(router.gate.weight, weight)
