"""The seed's MoERouter (MLP scorer, softmax | gumbel) and MLPTopKRouter built on it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_router.errors import RouterConfigurationError, ValidationError
from moe_router.routing import Mechanism, MLPTopKRouter, MoERouter, RouterConfig
from moe_router.routing import functional as F


def test_seed_usage_example_shapes():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6)
    router = MoERouter(dim=6, num_experts=2, hidden_layers=[32, 64])
    output = router(x)
    assert output.shape == (2, 4, 2)
    assert output.dtype == torch.float32
    assert bool((output >= 0).all())
    torch.testing.assert_close(output.sum(-1), torch.ones(2, 4))


@pytest.mark.parametrize(
    ("hidden_layers", "widths"),
    [(None, [(6, 3)]), (16, [(6, 16), (16, 3)]), ([32, 64], [(6, 32), (32, 64), (64, 3)])],
)
def test_hidden_layers_build_the_mlp(hidden_layers, widths):
    router = MoERouter(6, 3, hidden_layers)
    assert [(layer.in_features, layer.out_features) for layer in router.layers] == widths


def test_mlp_matches_linear_relu_stack():
    torch.manual_seed(1)
    router = MoERouter(6, 3, [8, 5])
    reference = nn.Sequential(
        router.layers[0], nn.ReLU(), router.layers[1], nn.ReLU(), router.layers[2]
    )
    x = torch.randn(4, 7, 6)
    torch.testing.assert_close(router.compute_logits(x), reference(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(router(x), torch.softmax(reference(x), dim=-1), rtol=1e-5, atol=1e-6)


def test_single_linear_by_hand():
    router = MoERouter(2, 2)
    with torch.no_grad():
        router.layers[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        router.layers[0].bias.copy_(torch.tensor([0.0, 1.0]))
    # logits [x0, 1]: x0 = 1 -> [0.5, 0.5]
    torch.testing.assert_close(router(torch.tensor([[1.0, 5.0]])), torch.tensor([[0.5, 0.5]]))


def test_softmax_is_over_experts_not_over_the_sequence():
    """Each token's probabilities depend only on that token."""
    torch.manual_seed(2)
    router = MoERouter(6, 4, 8)
    x = torch.randn(2, 5, 6)
    full = router(x)
    for i in range(5):
        torch.testing.assert_close(full[:, i : i + 1], router(x[:, i : i + 1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mechanism", ["top1", "Softmax", "", None, 3])
def test_unknown_mechanism_raises_value_error_naming_the_allowed(mechanism):
    with pytest.raises(ValueError, match="mechanism.*'softmax', 'gumbel'"):
        MoERouter(6, 2, mechanism=mechanism)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(dim=0, num_experts=2), "dim"),
        (dict(dim=6, num_experts=0), "num_experts"),
        (dict(dim=6, num_experts=2, hidden_layers=0), "hidden_layers"),
        (dict(dim=6, num_experts=2, hidden_layers=[8, -1]), r"hidden_layers\[1\]"),
        (dict(dim=6, num_experts=2, hidden_layers="32"), "hidden_layers"),
        (dict(dim=6.0, num_experts=2), "dim"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MoERouter(**kwargs)


def test_gumbel_in_training_matches_torch_gumbel_softmax():
    router = MoERouter(6, 5, mechanism="gumbel").train()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    logits = router.compute_logits(x)
    torch.manual_seed(9)
    ours = router(x)
    torch.manual_seed(9)
    reference = torch.nn.functional.gumbel_softmax(logits, tau=1.0, hard=False)
    torch.testing.assert_close(ours, reference)


def test_gumbel_noise_is_reproducible_with_a_generator():
    router = MoERouter(6, 5, mechanism=Mechanism.GUMBEL).train()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    a = router(x, generator=torch.Generator().manual_seed(1))
    b = router(x, generator=torch.Generator().manual_seed(1))
    c = router(x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, torch.softmax(router.compute_logits(x), -1))


def test_gumbel_in_eval_is_the_deterministic_softmax():
    router = MoERouter(6, 5, mechanism="gumbel").eval()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(router(x), torch.softmax(router.compute_logits(x), -1))


def test_half_precision_input_gives_fp32_probabilities():
    router = MoERouter(6, 4, 8)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    out = router(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, router(x.float()), rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad",
    [[[1.0] * 6], torch.zeros(2, 5), torch.zeros(2, 6, dtype=torch.int64), torch.zeros(())],
)
def test_bad_input_raises_validation_error(bad):
    with pytest.raises(ValidationError, match="x "):
        MoERouter(6, 2)(bad)


# ----------------------------------------------------------------- MLPTopKRouter
def _mlp_router(mechanism="softmax", **config) -> MLPTopKRouter:
    torch.manual_seed(4)
    return MLPTopKRouter(
        RouterConfig(hidden_size=6, num_experts=5, top_k=2, **config), [16], mechanism
    )


def test_mlp_topk_router_selects_topk_of_the_mlp_probabilities():
    router = _mlp_router(renormalize=False, routed_scaling_factor=3.0)
    x = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(5))
    out = router(x)
    logits = router.gate.compute_logits(x)
    torch.testing.assert_close(out.router_logits, logits, rtol=0, atol=0)
    weights, indices = F.topk_lowest_index(torch.softmax(logits, -1), 2)
    assert out.expert_indices.long().tolist() == indices.tolist()
    torch.testing.assert_close(out.expert_weights, 3.0 * weights)
    torch.testing.assert_close(out.z_loss, F.compute_z_loss(logits.reshape(14, 5)))
    assert isinstance(router.gate, MoERouter)
    assert all(key.startswith("gate.layers.") for key in router.state_dict())


def test_mlp_topk_router_renormalizes():
    out = _mlp_router()(torch.randn(9, 6, generator=torch.Generator().manual_seed(6)))
    torch.testing.assert_close(out.expert_weights.sum(-1), torch.ones(9))


def test_mlp_topk_router_gumbel_is_stochastic_only_in_training():
    router = _mlp_router("gumbel")
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(7))
    router.train()
    assert router.stochastic and router.mechanism is Mechanism.GUMBEL
    a = router(x, generator=torch.Generator().manual_seed(1))
    b = router(x, generator=torch.Generator().manual_seed(1))
    c = router(x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.expert_weights, b.expert_weights, rtol=0, atol=0)
    assert not torch.equal(a.expert_weights, c.expert_weights)
    router.eval()
    assert not router.stochastic
    plain = _mlp_router("softmax").eval()
    torch.testing.assert_close(router(x).expert_weights, plain(x).expert_weights)


def test_mlp_topk_router_rejects_bad_arguments():
    with pytest.raises(RouterConfigurationError, match="mechanism"):
        _mlp_router("argmax")
    with pytest.raises(RouterConfigurationError, match="hidden_layers"):
        MLPTopKRouter(RouterConfig(hidden_size=6, num_experts=5), hidden_layers=[0])
    with pytest.raises(RouterConfigurationError, match="scoring"):
        MLPTopKRouter(RouterConfig(hidden_size=6, num_experts=5, scoring="sigmoid"))
