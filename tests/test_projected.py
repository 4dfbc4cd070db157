"""The projected filters (subspace EKF, PULSE, last layer) and their warm-up, against
independent answers (``docs/algorithms.md`` 3.9):

* subspace EKF on a linear-Gaussian model is the Kalman filter in z: the batch Bayesian linear
  regression posterior of the design [x, 1] A^T, in closed form;
* last layer with a frozen body is the exact Bayesian linear regression on the body's features,
  computed by a ``torch.nn`` network loaded with the same parameters;
* PULSE equals a hand-written EKF in phi = [z, w] whose Jacobian is autodiff's of
  theta_0 + A^T z + S w pushed through ``torch.func``;
* the warm-up's end point equals ``torch.optim.SGD`` with momentum on an ``nn.Sequential`` (MSE
  and cross-entropy, and one output per row), and its basis sklearn's PCA components of the
  iterates (up to sign);
* through a real server: a warm-up model answers, a kill -9 and restart rebuild it and replay
  its log bit for bit, and bad specs are refused by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from torch import Tensor, nn
from torch.func import jacrev

from service.client import Client, PostserveHTTPError
from service.components.build import build_filter
from service.errors import InvalidSpec
from service.filters import OnlineFilter
from service.filters.subspace import Projected
from service.filters.warmup import sgd_trajectory
from service.schemas import ModelSpec
from service.testing import MakeServer
from service.testing.torchnets import relu_sequential

F64 = torch.float64


def _spec(network: dict[str, Any], filt: dict[str, Any], **extra: Any) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "p",
            "network": network,
            "likelihood": extra.pop("likelihood", {"type": "gaussian", "noise_variance": 0.3}),
            "filter": filt,
            "prior": extra.pop("prior", {"variance": 0.5}),
            "dtype": "float64",
            **extra,
        }
    )


def _data(n: int, i: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, i, dtype=F64, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, dtype=F64, generator=g)


def _blr(H: Tensor, y: Tensor, s0: float, r: float) -> tuple[Tensor, Tensor]:
    """The posterior N(m, P) of w ~ N(0, s0 I), y ~ N(H w, r I)."""
    P = torch.linalg.inv(torch.eye(H.shape[1], dtype=F64) / s0 + H.T @ H / r)
    return P @ H.T @ y / r, P


def _projected(f: OnlineFilter[Any]) -> Projected:
    assert isinstance(f.network, Projected)
    return f.network


def test_subspace_ekf_on_a_linear_model_is_the_kalman_filter_in_z() -> None:
    mean = torch.linspace(-1, 1, 6, dtype=F64)
    spec = _spec(
        {"type": "linear", "input_dim": 5},
        {"type": "subspace", "dim": 3},
        prior={"variance": 0.5, "mean": mean.tolist()},
    )
    f = build_filter(spec)
    net = _projected(f)
    x, y = _data(30, 5, seed=1)
    state, _ = f.run(f.init(dtype=F64), x, y)
    X = torch.cat([x, torch.ones(30, 1, dtype=F64)], 1)  # nn.Linear layout: weight, then bias
    m, P = _blr(X @ net.basis.T, y[:, 0] - X @ mean, 0.5, 0.3)
    torch.testing.assert_close(state.mean, m)
    torch.testing.assert_close(f.algorithm.covariance(state), P)
    assert torch.equal(net.offset, mean)


def test_a_random_basis_comes_back_from_the_seed_alone() -> None:
    net = {"type": "mlp", "input_dim": 20, "hidden": [30], "output_dim": 2}
    a = _projected(build_filter(_spec(net, {"type": "subspace", "dim": 40}, seed=7)))
    b = _projected(build_filter(_spec(net, {"type": "subspace", "dim": 40}, seed=7)))
    c = _projected(build_filter(_spec(net, {"type": "subspace", "dim": 40}, seed=8)))
    assert torch.equal(a.basis, b.basis) and torch.equal(a.offset, b.offset)
    assert not torch.equal(a.basis, c.basis)
    # entries N(0, 1/d): each theta_i then has prior variance about sigma_0^2 (sum over 40 rows)
    column = (a.basis**2).sum(0)
    assert abs(float(column.mean()) - 1.0) < 0.05
    assert abs(float(a.basis.std()) * 40**0.5 - 1.0) < 0.02


def test_last_layer_with_a_frozen_body_is_bayesian_linear_regression_on_its_features() -> None:
    spec = _spec({"type": "mlp", "input_dim": 4, "hidden": [7, 6]}, {"type": "last_layer"})
    f = build_filter(spec)
    net = _projected(f)
    x, y = _data(40, 4, seed=2)
    state, _ = f.run(f.init(dtype=F64), x, y)
    seq = relu_sequential(net.offset, [4, 7, 6, 1])
    with torch.no_grad():
        features = torch.cat([seq[:-1](x), torch.ones(40, 1, dtype=F64)], 1)
    w0 = net.offset[net.free]
    m, P = _blr(features, y[:, 0] - features @ w0, 0.5, 0.3)
    torch.testing.assert_close(state.mean, m)
    torch.testing.assert_close(f.algorithm.covariance(state), P)
    assert f.num_params == 7 and net.output_bias == slice(6, 7)


def test_pulse_is_the_ekf_in_phi_with_autodiff_jacobians() -> None:
    spec = _spec(
        {"type": "mlp", "input_dim": 3, "hidden": [5], "output_dim": 2}, {"type": "pulse", "dim": 4}
    )
    f = build_filter(spec)
    net = _projected(f)
    assert f.num_params == 4 + 2 * 6 and net.free == slice(20, 32)
    x, _ = _data(12, 3, seed=3)
    y = torch.stack([x[:, 0] * x[:, 1], torch.tanh(x[:, 2])], 1)
    state, _ = f.run(f.init(dtype=F64), x, y)
    seq = relu_sequential(torch.zeros(32, dtype=F64), [3, 5, 2])

    def g(phi: Tensor, row: Tensor) -> Tensor:
        theta = net.offset + phi[:4] @ net.basis + torch.cat([torch.zeros(20, dtype=F64), phi[4:]])
        params = {n: p for n, p in zip(dict(seq.named_parameters()), _split(theta), strict=True)}
        out: Tensor = torch.func.functional_call(seq, params, (row,))
        return out

    m, P, R = (
        torch.zeros(16, dtype=F64),
        0.5 * torch.eye(16, dtype=F64),
        0.3 * torch.eye(2, dtype=F64),
    )
    for n in range(12):
        H = jacrev(g)(m, x[n])
        S = H @ P @ H.T + R
        K = P @ H.T @ torch.linalg.inv(S)
        m, P = m + K @ (y[n] - g(m, x[n])), P - K @ H @ P
    torch.testing.assert_close(state.mean, m)
    torch.testing.assert_close(f.algorithm.covariance(state), P)


def _split(theta: Tensor) -> list[Tensor]:
    """theta of a 3-5-2 MLP as nn.Linear's (weight, bias) per layer."""
    return [theta[:15].view(5, 3), theta[15:20], theta[20:30].view(2, 5), theta[30:32]]


@pytest.mark.parametrize("case", ["mse", "cross_entropy", "outputs"])
def test_the_warmup_is_torch_sgd_with_momentum_and_its_basis_is_pca(case: str) -> None:
    x, y = _data(25, 3, seed=4)
    C = 1 if case == "mse" else 3
    theta0 = torch.randn(
        3 * 6 + 6 + 6 * C + C, dtype=F64, generator=torch.Generator().manual_seed(5)
    )
    seq = relu_sequential(theta0.clone(), [3, 6, C])
    opt = torch.optim.SGD(seq.parameters(), lr=0.05, momentum=0.9)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    picks = labels  # the "outputs" case: row n observes output labels[n], its y
    trace = []
    for _ in range(60):
        opt.zero_grad()
        out = seq(x)
        if case == "mse":
            loss = 0.5 * ((out - y) ** 2).sum(1).mean()
        elif case == "cross_entropy":
            loss = nn.functional.cross_entropy(out, labels)
        else:
            loss = 0.5 * ((out.gather(1, picks[:, None]) - y) ** 2).mean()
        loss.backward()
        opt.step()
        trace.append(torch.nn.utils.parameters_to_vector(seq.parameters()).detach().clone())
    spec = _spec(
        {"type": "mlp", "input_dim": 3, "hidden": [6], "output_dim": C},
        {"type": "subspace", "dim": 2},
        likelihood={"type": "categorical"} if case == "cross_entropy" else {"type": "gaussian"},
    )
    f = build_filter(spec)
    Y = y if case != "cross_entropy" else f.encode(labels.to(F64))
    outputs = picks.tolist() if case == "outputs" else None
    end, iterates = sgd_trajectory(
        f.network.base if isinstance(f.network, Projected) else f.network,
        f.likelihood,
        theta0,
        x,
        Y,
        outputs,
        epochs=60,
        learning_rate=0.05,
        momentum=0.9,
        keep=20,
    )
    torch.testing.assert_close(end, trace[-1])
    torch.testing.assert_close(iterates, torch.stack(trace[2::3]))  # every third, the last kept
    pca = PCA(n_components=2).fit(iterates.numpy())
    from service.filters.subspace import principal_basis

    A = principal_basis(iterates, 2, slice(0, end.shape[0])).numpy()
    np.testing.assert_allclose(np.abs((A * pca.components_).sum(1)), 1.0, atol=1e-8)


def test_a_warmup_filter_starts_at_the_end_point_and_refuses_what_does_not_fit() -> None:
    x, y = _data(30, 3, seed=6)
    warmup = {"x": x.tolist(), "y": y[:, 0].tolist(), "epochs": 40, "learning_rate": 0.05}
    net = {"type": "mlp", "input_dim": 3, "hidden": [6]}
    f = build_filter(
        _spec(net, {"type": "subspace", "dim": 5, "projection": "warmup", "warmup": warmup})
    )
    p = _projected(f)
    assert torch.allclose(p.basis @ p.basis.T, torch.eye(5, dtype=F64), atol=1e-10)
    before = float(((f.network.apply(torch.zeros(5, dtype=F64), x) - y) ** 2).mean())
    base = p.base.apply(p.base.init_mean(torch.Generator().manual_seed(0)), x)
    assert before < float(((base - y) ** 2).mean())  # the end point fits better than the prior mean
    bad: list[tuple[dict[str, Any], str]] = [
        ({"type": "subspace", "dim": 99}, "filter.dim 99 is more than the 31 parameters"),
        (
            {
                "type": "pulse",
                "dim": 2,
                "projection": "warmup",
                "warmup": {**warmup, "x": [[1.0]] * 30},
            },
            "filter.warmup: x must be 30 rows of 3 numbers",
        ),
        (
            {
                "type": "subspace",
                "dim": 2,
                "projection": "warmup",
                "warmup": {**warmup, "learning_rate": 900.0},
            },
            "filter.warmup diverged",
        ),
        (
            {
                "type": "subspace",
                "dim": 25,
                "projection": "warmup",
                "warmup": {**warmup, "epochs": 20},
            },
            "filter.dim 25 needs at least 26 warm-up iterates",
        ),
        ({"type": "pulse", "dim": 2}, None),
    ]
    for filt, message in bad:
        if message is None:  # pulse on a linear network has no hidden layers
            with pytest.raises(InvalidSpec, match="pulse projects the hidden layers"):
                build_filter(_spec({"type": "linear", "input_dim": 3}, filt))
            continue
        with pytest.raises(InvalidSpec, match=message):
            build_filter(_spec(net, filt))


def test_a_warmup_model_over_http_restarts_bit_for_bit(make_server: MakeServer) -> None:
    x, y = _data(40, 3, seed=7)
    spec = {
        "name": "warm",
        "network": {"type": "mlp", "input_dim": 3, "hidden": [8]},
        "likelihood": {"type": "gaussian", "noise_variance": 0.1},
        "filter": {
            "type": "subspace",
            "dim": 6,
            "projection": "warmup",
            "warmup": {
                "x": x[:20].tolist(),
                "y": y[:20, 0].tolist(),
                "epochs": 100,
                "learning_rate": 0.05,
            },
        },
        "prior": {"variance": 0.01},
        "dtype": "float64",
    }
    probe = x[30:].tolist()
    server = make_server(env={"POSTSERVE_SNAPSHOT_INTERVAL_S": "3600"})
    with Client(server.url) as c:
        info = c.create_model(spec)
        assert info.num_params == 6
        c.update("warm", x[20:30].tolist(), y[20:30, 0].tolist())
        before = c.predict("warm", probe)
        with pytest.raises(PostserveHTTPError) as err:
            c.create_model({**spec, "name": "bad", "filter": {**spec["filter"], "dim": 500}})
        assert err.value.status == 422 and "filter.dim 500" in str(err.value)
        with pytest.raises(PostserveHTTPError) as err:
            c.create_model(
                {
                    **spec,
                    "name": "bad",
                    "filter": {"type": "subspace", "dim": 2, "projection": "warmup"},
                }
            )
        assert err.value.status == 422 and "warmup" in str(err.value)
    url = server.restart(crash=True)
    with Client(url) as c:
        assert c.get_model("warm").version == 10
        assert c.predict("warm", probe) == before
        assert [m.name for m in c.list_models()] == ["warm"]


def test_the_readme_block_on_large_networks_runs(make_server: MakeServer) -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    title = "\n## Large networks: CNNs, subspaces, last layers, SGD baselines\n"
    section = readme.split(title, 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    server = make_server()
    namespace: dict[str, Any] = {}
    exec(compile(code.replace("http://127.0.0.1:8000", server.url), "README.md", "exec"), namespace)
    bayes, point, y = namespace["bayes"], namespace["point"], namespace["y"]
    assert point.point_estimate and not bayes.point_estimate
    assert all(v[0] > 0 for v in bayes.epistemic_variance)
    assert all(v == [0.0] for v in point.epistemic_variance)
    err = float(np.mean((np.array(bayes.mean)[:, 0] - y[250:]) ** 2))
    assert err < 0.5 * float(np.var(y[250:]))  # it learnt: half the variance explained at least
