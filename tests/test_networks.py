"""Networks: the flat layout is PyTorch's nn.Linear layout, and the analytic Jacobians equal autodiff."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.errors import InvalidSpec
from service.filters import MLP, Linear, jacobian_autodiff

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
