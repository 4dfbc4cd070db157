"""Networks: the flat layout is PyTorch's nn.Linear layout, and the analytic Jacobians equal autodiff."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from service.errors import InvalidSpec
from service.filters import MLP, Linear, jacobian_autodiff
from service.filters.convnets import CNN
from service.filters.networks import _layers

_ACT = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "gelu": nn.GELU(), "elu": nn.ELU()}


def _sequential(net: MLP) -> nn.Sequential:
    layers: list[nn.Module] = []
    sizes = net.sizes
    for k in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[k], sizes[k + 1]).double())
        if k < len(sizes) - 2:
            layers.append(_ACT[net.activation])
    return nn.Sequential(*layers)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "elu"])
def test_mlp_flat_layout_matches_torch_sequential(activation: str) -> None:
    torch.manual_seed(0)
    net = MLP(input_dim=5, hidden=(7, 3), output_dim=4, activation=activation)  # type: ignore[arg-type]
    seq = _sequential(net)
    theta = torch.cat([p.detach().reshape(-1) for p in seq.parameters()])
    assert theta.shape == (net.num_params,)
    x = torch.randn(11, 5, dtype=torch.float64)
    torch.testing.assert_close(net.apply(theta, x), seq(x).detach(), rtol=1e-12, atol=1e-12)


def test_linear_layout_matches_nn_linear() -> None:
    torch.manual_seed(1)
    for bias in (True, False):
        layer = nn.Linear(4, 3, bias=bias).double()
        theta = torch.cat([p.detach().reshape(-1) for p in layer.parameters()])
        net = Linear(4, 3, bias=bias)
        x = torch.randn(6, 4, dtype=torch.float64)
        torch.testing.assert_close(net.apply(theta, x), layer(x).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "elu"])
def test_mlp_jacobian_equals_autodiff(activation: str) -> None:
    net = MLP(input_dim=4, hidden=(6, 5), output_dim=3, activation=activation)  # type: ignore[arg-type]
    theta = net.init_mean(torch.Generator().manual_seed(2))
    x = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g, J = net.jacobian(theta, x)
    torch.testing.assert_close(g, net.apply(theta, x), rtol=0, atol=0)
    torch.testing.assert_close(J, jacobian_autodiff(net, theta, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_jacobian_equals_autodiff(bias: bool) -> None:
    net = Linear(input_dim=3, output_dim=2, bias=bias)
    theta = torch.randn(net.num_params, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    _, J = net.jacobian(theta, x)
    torch.testing.assert_close(J, jacobian_autodiff(net, theta, x), rtol=0, atol=1e-15)


def test_apply_on_stacked_draws_equals_one_by_one() -> None:
    net = MLP(input_dim=3, hidden=(4,), output_dim=2)
    thetas = torch.randn(5, net.num_params, dtype=torch.float64)
    x = torch.randn(7, 3, dtype=torch.float64)
    stacked = net.apply(thetas, x)
    assert stacked.shape == (5, 7, 2)
    for s in range(5):
        torch.testing.assert_close(stacked[s], net.apply(thetas[s], x), rtol=1e-14, atol=1e-14)


def test_bad_specs_are_rejected_with_a_message() -> None:
    with pytest.raises(InvalidSpec, match="activation"):
        MLP(input_dim=3, hidden=(4,), activation="sigmoid")  # type: ignore[arg-type]
    with pytest.raises(InvalidSpec, match="input_dim"):
        Linear(input_dim=0)


def _layer_slices(net: MLP | CNN) -> list[tuple[int, int, int, int]]:
    """(fan_in, weight at, bias at, end) of each layer of a dense stack or a CNN."""
    if isinstance(net, CNN):
        plans = net._plans
        return [
            (math.prod(p.weight[1:]), p.w_at, p.w_at + math.prod(p.weight), p.end) for p in plans
        ]
    return [(fi, w_at, b_at, b_at + fo) for fi, fo, w_at, b_at in _layers(net.sizes, True)]


@pytest.mark.parametrize(
    "net",
    [
        MLP(input_dim=784, hidden=(500, 300), output_dim=10, init="lecun"),
        CNN((1, 28, 28), output_dim=10, init="lecun"),
    ],
    ids=["mlp", "lenet5"],
)
def test_lecun_init_is_flax_lecun_normal_with_zero_biases(net: MLP | CNN) -> None:
    """Each layer's weights ~ N(0, 1/fan_in) truncated at two sd (jax.nn.initializers'
    lecun_normal: the truncated normal rescaled to keep that variance), its biases 0."""
    theta = net.init_mean(torch.Generator().manual_seed(3))
    assert theta.shape == (net.num_params,) and theta.dtype == torch.float64
    for fan_in, w_at, b_at, end in _layer_slices(net):
        w, b = theta[w_at:b_at], theta[b_at:end]
        assert torch.equal(b, torch.zeros_like(b))
        sd = 1 / math.sqrt(fan_in)
        assert float(w.abs().max()) <= 2 * sd / 0.8796256610342398 * (1 + 1e-12)
        n = w.numel()
        # the variance of a sample of n: 1/fan_in within 5 standard errors (kurtosis of the
        # truncated normal about 2.36: sd of the sample variance sqrt((k - 1) / n) sd^2)
        assert abs(float(w.var()) / sd**2 - 1) < 5 * math.sqrt(1.4 / n) + 1e-9
        assert abs(float(w.mean())) < 5 * sd / math.sqrt(n)


def test_uniform_init_stays_the_default_and_an_unknown_init_is_refused() -> None:
    g = torch.Generator().manual_seed(0)
    default = MLP(input_dim=5, hidden=(4,), output_dim=2).init_mean(g)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(
        MLP(input_dim=5, hidden=(4,), output_dim=2, init="uniform").init_mean(g), default
    )
    ref = torch.Generator().manual_seed(0)
    first = (torch.rand(4 * 5 + 4, generator=ref, dtype=torch.float64) * 2 - 1) * (1 / math.sqrt(5))
    torch.testing.assert_close(default[:24], first, rtol=0, atol=0)  # nn.Linear's bounds
    with pytest.raises(InvalidSpec, match="init"):
        MLP(input_dim=5, hidden=(4,), init="xavier")  # type: ignore[arg-type]
    with pytest.raises(InvalidSpec, match="init"):
        CNN((1, 8, 8), layers=(), init="he")  # type: ignore[arg-type]
