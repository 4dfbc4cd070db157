"""J Sigma J^T without J: the structured Jacobian operators against the dense Jacobian.

Independent answers: the dense J of ``network.jacobian`` (itself checked against autodiff in
test_networks.py), the dense covariance of each belief (``algorithm.covariance``), and the dense
predictive path ``likelihood.predictive(eta, J Sigma J^T)``. Everything in float64, to 1e-10.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from service.client import Client
from service.filters import (
    EKF,
    MLP,
    Algorithm,
    Bernoulli,
    Categorical,
    Diagonal,
    DiagState,
    Gaussian,
    GaussState,
    Likelihood,
    Linear,
    LoFi,
    LoFiState,
    OnlineFilter,
    Poisson,
)
from service.filters import ekf as ekf_module
from service.filters import online as online_module
from service.filters.networks import (
    DenseJacobian,
    Jacobian,
    Network,
    dense_operator,
    jacobian_autodiff,
)
from service.testing import MakeAppClient

F64 = torch.float64


def _close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(
        got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}" if what else m
    )


NETWORKS: list[tuple[str, Network]] = [
    ("linear-bias-C1", Linear(input_dim=4, output_dim=1)),
    ("linear-bias-C3", Linear(input_dim=4, output_dim=3)),
    ("linear-nobias-C1", Linear(input_dim=4, output_dim=1, bias=False)),
    ("linear-nobias-C3", Linear(input_dim=4, output_dim=3, bias=False)),
    ("mlp-relu-C1", MLP(input_dim=4, hidden=(5, 6, 3), output_dim=1, activation="relu")),
    ("mlp-tanh-C3", MLP(input_dim=4, hidden=(5, 6, 3), output_dim=3, activation="tanh")),
    ("mlp-gelu-C3", MLP(input_dim=4, hidden=(7, 5), output_dim=3, activation="gelu")),
    ("mlp-elu-C2", MLP(input_dim=4, hidden=(6,), output_dim=2, activation="elu")),
]
NET_IDS = [n for n, _ in NETWORKS]


def _point(net: Network, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta = net.init_mean(g) + 0.1 * torch.randn(net.num_params, dtype=F64, generator=g)
    return theta, torch.randn(rows, net.input_dim, dtype=F64, generator=g)


def _beliefs(D: int, seed: int) -> list[tuple[str, Algorithm[Any], Any]]:
    """(name, algorithm, state) with random, well-conditioned beliefs (W far from zero)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(D, dtype=F64, generator=g)
    A = torch.randn(D, D, dtype=F64, generator=g) / D**0.5
    return [
        ("diagonal", Diagonal(), DiagState(mean, torch.rand(D, dtype=F64, generator=g) + 0.2)),
        ("ekf", EKF(), GaussState(mean, A @ A.mT + 0.1 * torch.eye(D, dtype=F64))),
        (
            "lofi-0",
            LoFi(rank=0),
            LoFiState(mean, mean.new_zeros((0, D)), torch.rand(D, dtype=F64, generator=g) + 0.5),
        ),
        (
            "lofi-4",
            LoFi(rank=4),
            LoFiState(
                mean,
                torch.randn(4, D, dtype=F64, generator=g),
                torch.rand(D, dtype=F64, generator=g) + 0.5,
            ),
        ),
    ]


@pytest.mark.parametrize(("name", "net"), NETWORKS, ids=NET_IDS)
def test_operator_equals_the_dense_jacobian(name: str, net: Network) -> None:
    theta, x = _point(net, rows=7, seed=1)
    g_dense, J = net.jacobian(theta, x)
    g, op = net.jacobian_operator(theta, x)
    N, C, D = J.shape
    assert op.shape == (N, C, D)
    torch.testing.assert_close(g, g_dense, rtol=0, atol=0)
    torch.testing.assert_close(op.dense(), J, rtol=0, atol=0)
    torch.testing.assert_close(op.dense(2, 5), J[2:5], rtol=0, atol=0)
    gen = torch.Generator().manual_seed(2)
    u = torch.rand(D, dtype=F64, generator=gen) + 0.1
    _close(op.gram(u), J @ torch.diag(u) @ J.mT)
    for k in (1, 5):
        V = torch.randn(k, D, dtype=F64, generator=gen)
        want = torch.einsum("ncd,kd->nkc", J, V)  # [n, j] = J_n v_j
        _close(op.jvp(V), want)
        _close(DenseJacobian(J).jvp(V), want)
    _close(DenseJacobian(J).gram(u), J @ torch.diag(u) @ J.mT)


@pytest.mark.parametrize(("name", "net"), NETWORKS, ids=NET_IDS)
def test_every_projection_equals_the_dense_j_sigma_jt(name: str, net: Network) -> None:
    theta, x = _point(net, rows=6, seed=3)
    _, J = net.jacobian(theta, x)
    _, op = net.jacobian_operator(theta, x)
    for algo_name, algorithm, state in _beliefs(net.num_params, seed=4):
        Sigma = algorithm.covariance(state)
        want = J @ Sigma @ J.mT
        got = algorithm.project(state, op)
        assert got.shape == want.shape, algo_name
        _close(got, want, algo_name)
        dense = algorithm.project(state, DenseJacobian(J))
        _close(dense, want)


def test_ekf_forms_the_dense_jacobian_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    net = MLP(input_dim=3, hidden=(4,), output_dim=2)
    theta, x = _point(net, rows=9, seed=5)
    _, J = net.jacobian(theta, x)
    _, op = net.jacobian_operator(theta, x)
    _, algorithm, state = _beliefs(net.num_params, seed=6)[1]
    monkeypatch.setattr(ekf_module, "_DENSE_NUMBERS", 2 * 2 * net.num_params)  # 2 rows a block
    Sigma = algorithm.covariance(state)
    _close(algorithm.project(state, op), J @ Sigma @ J.mT)


LIKELIHOODS: list[tuple[str, Likelihood, int]] = [
    ("gaussian", Gaussian((0.3, 0.6, 1.0)), 3),
    ("bernoulli", Bernoulli(), 1),
    ("categorical", Categorical(), 3),
    ("poisson", Poisson(), 1),
]


@pytest.mark.parametrize(
    ("lik_name", "likelihood", "C"), LIKELIHOODS, ids=[n for n, _, _ in LIKELIHOODS]
)
@pytest.mark.parametrize("algo", ["diagonal", "ekf", "lofi-0", "lofi-4"])
def test_predictive_equals_the_dense_path(
    lik_name: str, likelihood: Likelihood, C: int, algo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``OnlineFilter.predictive`` (structured, in chunks) against the dense path of today's
    code, likelihood.predictive(eta, J Sigma J^T) on the whole J, with chunks of 4 rows so that
    the chunk boundaries are crossed."""
    net = MLP(input_dim=4, hidden=(6, 5), output_dim=C, activation="tanh")
    D = net.num_params
    (_, algorithm, state) = next(b for b in _beliefs(D, seed=7) if b[0] == algo)
    f = OnlineFilter(net, likelihood, algorithm)
    _, x = _point(net, rows=11, seed=8)
    monkeypatch.setattr(online_module, "_CHUNK_ROWS", 4)
    got = f.predictive(state, x)
    eta, J = net.jacobian(state.mean, x)
    Sigma = algorithm.covariance(state)
    want = likelihood.predictive(eta, J @ Sigma @ J.mT)
    for field in ("mean", "epistemic", "aleatoric"):
        _close(getattr(got, field), getattr(want, field))


class _Unstructured:
    """A network with no closed form: g = tanh(W x) ⊙ (1 + b), J by autodiff, the dense operator."""

    input_dim, output_dim = 3, 2
    num_params = 3 * 2 + 2
    linear_in_params = False
    output_bias = None  # b scales the outputs: no bias adds to them

    def apply(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        W = theta[..., :6].reshape(*theta.shape[:-1], 2, 3)
        return torch.tanh(x @ W.mT) * (1 + theta[..., 6:]).unsqueeze(-2)

    def jacobian(self, theta: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(theta, x), jacobian_autodiff(self, theta, x)

    def jacobian_operator(
        self, theta: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, Jacobian]:
        return dense_operator(self, theta, x)

    @property
    def jacobian_numbers(self) -> int:
        return self.output_dim * self.num_params

    def init_mean(self, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(self.num_params, dtype=F64, generator=generator)


def test_a_network_without_structure_predicts_through_the_dense_fallback() -> None:
    net = _Unstructured()
    assert isinstance(net, Network)
    (_, algorithm, state) = _beliefs(net.num_params, seed=9)[3]  # lofi-4
    f = OnlineFilter(net, Gaussian(), algorithm)
    _, x = _point(net, rows=5, seed=10)
    got = f.predictive(state, x)
    eta, J = net.jacobian(state.mean, x)
    want = Gaussian().predictive(eta, J @ algorithm.covariance(state) @ J.mT)
    _close(got.mean, want.mean)
    _close(got.epistemic, want.epistemic)


def test_the_mean_alone_is_one_forward_pass_for_the_gaussian(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = MLP(input_dim=4, hidden=(6,), output_dim=3)
    (_, algorithm, state) = _beliefs(net.num_params, seed=11)[3]
    f = OnlineFilter(net, Gaussian(), algorithm)
    _, x = _point(net, rows=7, seed=12)
    want = f.predictive(state, x).mean

    def no_jacobian(*args: object) -> None:
        raise AssertionError("the gaussian mean needs no Jacobian")

    monkeypatch.setattr(MLP, "jacobian_operator", no_jacobian)
    _close(f.predictive_mean(state, x), want)
    assert not Gaussian().mean_needs_variance
    assert all(lik.mean_needs_variance for lik in (Bernoulli(), Categorical(), Poisson()))


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_predict_can_ask_for_the_mean_alone(app_client: MakeAppClient, likelihood: str) -> None:
    h = app_client()
    spec = {
        "name": "m",
        "network": {"type": "mlp", "input_dim": 3, "hidden": [4], "activation": "tanh"},
        "likelihood": {"type": likelihood},
        "filter": {"type": "lofi", "rank": 2},
        "dtype": "float64",
    }
    rows = [[0.1, -0.4, 1.0], [2.0, 0.3, -0.7]]
    with Client(str(h.base_url), transport=h.transport) as c:
        c.create_model(spec)
        c.update("m", rows, [1.0, 0.0])
        full = c.predict("m", rows, num_samples=3, seed=5)
        alone = c.predict("m", rows, num_samples=3, seed=5, variance=False)
    assert alone.version == full.version
    assert alone.samples == full.samples
    assert alone.variance == alone.epistemic_variance == alone.aleatoric_variance == []
    assert len(full.variance) == 2
    for a, b in zip(alone.mean, full.mean, strict=True):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15)
    r = h.post("/v1/models/m/predict", json={"x": rows, "variance": "maybe"})
    assert r.status_code == 422 and "variance" in r.json()["error"]["message"]
