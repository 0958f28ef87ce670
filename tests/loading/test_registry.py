"""Router construction from config: every kind, deterministic random init, devices, faults."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

from moe_router.config import ServiceConfig, load_config
from moe_router.errors import NotFoundError, RouterConfigurationError
from moe_router.loading.fault_injection import FaultInjectingRouter
from moe_router.loading.registry import build_router, load_routers, resolve_device
from moe_router.routing.router_config import RouterConfig

CPU = torch.device("cpu")


def config_of(tmp_path: Path, routers: str, head: str = "") -> ServiceConfig:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(head) + "routers:\n" + textwrap.indent(
        textwrap.dedent(routers), "  "))
    return load_config(path, env={})


# --------------------------------------------------------------------------- devices
def test_auto_device_is_cuda_only_when_available() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only host")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_says_so(name: str) -> None:
    with pytest.raises(RouterConfigurationError,
                       match=f"server.device: '{name}' needs CUDA, but torch .* sees no CUDA "
                             "device; use 'cpu' or 'auto'"):
        resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_devices_resolve_and_missing_ones_are_named() -> None:
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    count = torch.cuda.device_count()
    with pytest.raises(RouterConfigurationError, match=f"'cuda:{count}' does not exist"):
        resolve_device(f"cuda:{count}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_routers_are_built_on_the_configured_cuda_device(tmp_path: Path) -> None:
    config = config_of(tmp_path, "- {name: r, kind: top_k, input_dim: 16, num_experts: 4}\n",
                       head="server: {device: 'cuda:0'}\n")
    hosted = load_routers(config)["r"]
    assert hosted.device == torch.device("cuda:0")
    assert hosted.router(0).gate.weight.device.type == "cuda"
    cpu = load_routers(load_config(tmp_path / "config.yaml", env={},
                                   overrides={"server.device": "cpu"}))["r"]
    x = torch.randn(5, 16)
    torch.testing.assert_close(hosted.router(0)(x.cuda()).expert_weights.cpu(),
                               cpu.router(0)(x).expert_weights)


def test_unknown_device_name_is_refused() -> None:
    with pytest.raises(RouterConfigurationError, match="must be 'auto', 'cpu', 'cuda' or"):
        resolve_device("tpu")


# --------------------------------------------------------------------------- the default
def test_default_config_builds_and_routes_every_router() -> None:
    config = load_config(env={}, overrides={"server.device": "cpu"})
    hosted = load_routers(config)
    assert list(hosted) == ["mixtral", "qwen3", "deepseek-v3", "dynamic"]
    total_bytes = 0
    for name, entry in hosted.items():
        spec = entry.spec
        assert len(entry.layers) == spec.layers == len(entry.versions)
        assert len(set(entry.versions)) == spec.layers, name  # each layer its own weights
        for layer, router in enumerate(entry.layers):
            assert not router.training
            assert all(not p.requires_grad for p in router.parameters())
            assert router.gate.weight.shape == (spec.num_experts, spec.input_dim)
            assert router.version() == entry.versions[layer]
            x = torch.randn(2, 3, spec.input_dim, generator=torch.Generator().manual_seed(0))
            out = router(x)
            assert out.expert_indices.shape[:2] == (2, 3)
            assert int(out.num_experts_per_token.min()) >= 1
            total_bytes += sum(t.numel() * t.element_size() for t in router.state_dict().values())
    assert total_bytes < 100 * 1024 * 1024
    assert hosted["deepseek-v3"].router(1).e_score_correction_bias.shape == (256,)


def test_random_logits_have_the_scale_of_nn_linear() -> None:
    config = load_config(env={})
    spec = next(s for s in config.routers if s.name == "mixtral")
    weight = build_router(spec, 0, CPU).gate.weight
    bound = 1.0 / math.sqrt(spec.input_dim)
    assert float(weight.abs().max()) <= bound
    # uniform(-b, b) has std b / sqrt(3); 32768 draws pin it to well within 2%
    assert abs(float(weight.std()) / (bound / math.sqrt(3)) - 1.0) < 0.02


# --------------------------------------------------------------------------- determinism
ONE = "- {name: r, kind: top_k, input_dim: 32, num_experts: 8, layers: 3, weights: {seed: %d}}\n"


def test_random_init_is_deterministic_per_seed_plus_layer(tmp_path: Path) -> None:
    spec = config_of(tmp_path, ONE % 10).routers[0]
    first = [build_router(spec, layer, CPU).gate.weight for layer in range(3)]
    again = [build_router(spec, layer, CPU).gate.weight for layer in range(3)]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])
    shifted = config_of(tmp_path, ONE % 12).routers[0]
    assert torch.equal(build_router(shifted, 0, CPU).gate.weight, first[2])  # 12 + 0 == 10 + 2


def test_building_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    spec = config_of(tmp_path, ONE % 0).routers[0]
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_router(spec, 1, CPU)
    assert torch.equal(torch.rand(4), expected)


def test_layer_outside_the_spec_is_refused(tmp_path: Path) -> None:
    spec = config_of(tmp_path, ONE % 0).routers[0]
    with pytest.raises(RouterConfigurationError, match=r"routers\[0\].layers: layer 3 is outside"):
        build_router(spec, 3, CPU)


def test_hosted_router_names_the_valid_layers(tmp_path: Path) -> None:
    hosted = load_routers(config_of(tmp_path, ONE % 0))["r"]
    assert hosted.router(2) is hosted.layers[2]
    for layer in (3, -1):
        message = rf"router 'r' serves layers 0..2, got layer {layer}"
        with pytest.raises(NotFoundError, match=message):
            hosted.router(layer)


# --------------------------------------------------------------------------- every kind
KINDS = [
    ("kind: top_k, top_k: 2", "TopKRouter"),
    ("kind: grouped_top_k, top_k: 2, n_group: 4, topk_group: 2, use_correction_bias: true",
     "GroupedTopKRouter"),
    ("kind: expert_choice, tokens_per_expert: 2", "ExpertChoiceRouter"),
    ("kind: soft_moe, slots_per_expert: 2, temperature: 0.5", "SoftMoERouter"),
    ("kind: moe_router, top_k: 2, hidden_layers: [32], mechanism: softmax", "MLPTopKRouter"),
    ("kind: dynamic, min_experts: 1, max_experts: 3, routing_strategy: threshold, top_p: 0.6",
     "DynamicRouter"),
    ("kind: adaptive, min_experts: 1, max_experts: 3, adaptation_rate: 0.05", "AdaptiveRouter"),
    ("kind: fault_injection, top_k: 2", "FaultInjectingRouter"),
]


@pytest.mark.parametrize(("keys", "class_name"), KINDS)
def test_every_kind_builds_its_class_and_routes(
    tmp_path: Path, keys: str, class_name: str
) -> None:
    config = config_of(tmp_path, f"- {{name: r, input_dim: 16, num_experts: 8, {keys}}}\n",
                       head="testing: {enable_fault_injection: true}\n")
    router = load_routers(config)["r"].router(0)
    assert type(router).__name__ == class_name
    out = router(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)))
    assert out.expert_indices.shape[0] == 6


def test_kind_arguments_reach_the_router(tmp_path: Path) -> None:
    config = config_of(tmp_path, """
        - {name: soft, kind: soft_moe, input_dim: 16, num_experts: 8, slots_per_expert: 3,
           temperature: 0.5}
        - {name: dyn, kind: dynamic, input_dim: 16, num_experts: 8, min_experts: 2,
           max_experts: 5, routing_strategy: threshold, top_p: 0.6, noise_factor: 0.0}
        - {name: ec, kind: expert_choice, input_dim: 16, num_experts: 8, tokens_per_expert: 3}
        - {name: ent, kind: dynamic, input_dim: 16, num_experts: 8,
           complexity_estimator: attention_entropy, estimator_options: {head_aggregation: max}}
    """)
    hosted = load_routers(config)
    assert hosted["soft"].router(0).gate.weight.shape == (24, 16)
    dyn = hosted["dyn"].router(0)
    assert dyn.k_range == (2, 5) and dyn.top_p == 0.6
    assert hosted["ec"].router(0).tokens_per_expert == 3
    assert hosted["ent"].router(0).estimator.head_aggregation.value == "max"


# --------------------------------------------------------------------------- fault injection
def test_fault_injection_fails_while_the_file_exists(tmp_path: Path) -> None:
    config = config_of(tmp_path, """
        - {name: flaky, kind: fault_injection, input_dim: 8, num_experts: 4,
           fault: {fail_while_file_exists: fail.flag}}
    """, head="testing: {enable_fault_injection: true}\n")
    router = load_routers(config)["flaky"].router(0)
    assert isinstance(router, FaultInjectingRouter) and router.stateful
    x = torch.randn(3, 8)
    healthy = router(x)
    (tmp_path / "fail.flag").touch()
    with pytest.raises(RuntimeError, match="injected fault: .*fail.flag exists"):
        router(x)
    with pytest.raises(RuntimeError, match="injected fault"):
        router.route_many([x, x])
    (tmp_path / "fail.flag").unlink()
    torch.testing.assert_close(router(x).expert_weights, healthy.expert_weights)


def test_fault_injection_stalls_while_the_slow_file_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moe_router.loading.fault_injection as fault_injection

    slept: list[float] = []
    monkeypatch.setattr(fault_injection.time, "sleep", slept.append)
    flag = tmp_path / "slow.flag"
    router = FaultInjectingRouter(RouterConfig(hidden_size=8, num_experts=4), None, flag, 250.0)
    x = torch.randn(3, 8)
    router(x)
    assert slept == []
    flag.touch()
    router(x)
    assert slept == [0.25]


def test_fault_injection_rejects_a_negative_delay() -> None:
    with pytest.raises(RouterConfigurationError, match="slow_ms: must be a number >= 0"):
        FaultInjectingRouter(RouterConfig(hidden_size=8, num_experts=4), None, None, -1.0)
