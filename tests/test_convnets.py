"""The ``cnn`` network against ``torch.nn`` and autodiff (``docs/algorithms.md`` 1.5).

* LeNet-5 (the preset) has the talk's 61,706 parameters, and its forward pass equals an
  ``nn.Sequential`` of ``nn.Conv2d`` / ``nn.AvgPool2d`` / ``nn.Linear`` loaded with the same flat
  vector (``vector_to_parameters``): the documented layout is PyTorch's;
* the Jacobian (``vmap(jacrev)``) equals ``torch.autograd.functional.jacobian`` row by row, with
  max pooling and a stride;
* draws stacked (S, D) evaluate as S separate passes; the default prior mean is PyTorch's init
  law; specs that do not fit are refused by name; a LoFi model on LeNet-5 learns through a real
  server.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from service.client import Client, PostserveHTTPError
from service.components.build import build_filter
from service.errors import InvalidSpec
from service.filters.convnets import CNN, Conv, Dense, Pool
from service.schemas import ModelSpec
from service.testing import MakeServer

F64 = torch.float64


def _lenet(theta: torch.Tensor) -> nn.Sequential:
    seq = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    ).to(F64)  # fmt: skip
    nn.utils.vector_to_parameters(theta, seq.parameters())
    return seq


def _spec(network: dict[str, Any], **extra: Any) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "cnn",
            "network": network,
            "likelihood": {"type": "categorical"},
            "filter": extra.pop("filter", {"type": "lofi", "rank": 2}),
            "dtype": "float64",
            **extra,
        }
    )


def test_lenet5_is_torch_nn_lenet5_in_the_same_layout() -> None:
    f = build_filter(
        _spec({"type": "cnn", "input_shape": [1, 28, 28], "preset": "lenet5", "output_dim": 10})
    )
    assert f.num_params == 61_706 and f.network.input_dim == 784
    theta = f.network.init_mean(torch.Generator().manual_seed(0))
    x = torch.rand(5, 784, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _lenet(theta.clone())(x.view(5, 1, 28, 28))
    torch.testing.assert_close(f.network.apply(theta, x), want)
    assert f.network.output_bias == slice(61_696, 61_706)


def test_the_jacobian_is_autograd_row_by_row() -> None:
    net = CNN((2, 7, 7), (Conv(3, 3, padding=1, stride=2), Pool("max", 2), Dense(5)), 3, "tanh")
    theta = net.init_mean(torch.Generator().manual_seed(2)) + 0.05
    x = torch.randn(4, net.input_dim, dtype=F64, generator=torch.Generator().manual_seed(3))
    g, J = net.jacobian(theta, x)
    assert J.shape == (4, 3, net.num_params)
    for n in range(4):
        want = torch.autograd.functional.jacobian(
            lambda t, n=n: net.apply(t, x[n : n + 1])[0], theta
        )
        torch.testing.assert_close(J[n], want)
    torch.testing.assert_close(g, net.apply(theta, x))
    draws = torch.stack([theta, theta * 0.5, -theta])
    stacked = net.apply(draws, x)
    for s in range(3):
        torch.testing.assert_close(stacked[s], net.apply(draws[s], x))


def test_the_default_prior_mean_is_pytorchs_init_law() -> None:
    net = CNN((1, 28, 28), output_dim=10)
    theta = net.init_mean(torch.Generator().manual_seed(4))
    conv1 = theta[:150]  # 6 x 1 x 5 x 5: fan_in 25, U(-0.2, 0.2)
    assert float(conv1.abs().max()) <= 0.2 and float(conv1.abs().max()) > 0.19
    assert abs(float(conv1.var()) - 0.2**2 / 3) < 0.004


def test_cnn_specs_that_do_not_fit_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="either"):
        _spec({"type": "cnn", "input_shape": [1, 8, 8]})
    with pytest.raises(InvalidSpec, match="leaves no pixels"):
        build_filter(
            _spec(
                {
                    "type": "cnn",
                    "input_shape": [1, 4, 4],
                    "layers": [{"type": "conv", "channels": 2, "kernel": 5}],
                }
            )
        )
    with pytest.raises(InvalidSpec, match="a conv after a dense layer"):
        CNN((1, 8, 8), (Dense(4), Conv(2, 3)), 2)


def test_lofi_on_lenet5_learns_over_http(make_server: MakeServer) -> None:
    """Two classes of 28 x 28 images (a bright top half, a bright bottom half): after 30 labelled
    rows the model classifies new ones better than chance, and a bad row is refused by name."""
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 2, (40,), generator=gen)
    images = 0.1 * torch.rand(40, 28, 28, generator=gen, dtype=F64)
    for n, c in enumerate(labels.tolist()):
        images[n, :14] += 0.9 * (c == 0)
        images[n, 14:] += 0.9 * (c == 1)
    x = images.reshape(40, 784)
    spec = {
        "name": "lenet",
        "network": {"type": "cnn", "input_shape": [1, 28, 28], "preset": "lenet5", "output_dim": 2},
        "likelihood": {"type": "categorical"},
        "filter": {"type": "lofi", "rank": 5},
        "prior": {"variance": 0.1},
    }
    server = make_server()
    with Client(server.url) as c:
        assert c.create_model(spec).num_params == 61_706 - 84 * 8 - 8
        c.update("lenet", x[:30].tolist(), labels[:30].tolist())
        probs = c.predict("lenet", x[30:].tolist()).mean
        right = sum(
            int(p[1] > p[0]) == int(c_) for p, c_ in zip(probs, labels[30:].tolist(), strict=True)
        )
        assert right >= 8
        with pytest.raises(PostserveHTTPError) as err:
            c.update("lenet", [[0.0] * 783], [0])
        assert err.value.status == 422 and "784" in str(err.value)
