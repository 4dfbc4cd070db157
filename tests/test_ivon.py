"""IVON (``service.filters.ivon``, ``docs/algorithms.md`` 3.12) against its derived fixed point:
cycling over a linear-Gaussian data set with lambda = N, the mean goes to the exact posterior
mean and the precision lambda (h + delta) to the diagonal of the exact posterior precision (the
mean-field Gaussian closest to the posterior in KL(q || p)), not to the inverse of the posterior
marginal variances; and as a service model it learns a real stream (diabetes) and replays."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_diabetes

from service.components.build import build_filter
from service.filters import Gaussian, Linear, OnlineFilter, Prior
from service.filters.ivon import IVON
from service.schemas import ModelSpec
from service.testing import MakeAppClient

F64 = torch.float64


def test_the_fixed_point_is_the_mean_field_posterior() -> None:
    rng = np.random.default_rng(0)
    N, r, prior_var = 40, 0.5, 2.0
    X = rng.normal(size=(N, 2))
    X[:, 1] += 0.8 * X[:, 0]  # correlated parameters: mean field differs from the marginals
    y = X @ np.array([1.5, -0.7]) + 0.2 + rng.normal(0, np.sqrt(r), N)
    H = np.hstack([X, np.ones((N, 1))])
    Lam = H.T @ H / r + np.eye(3) / prior_var
    mu = np.linalg.solve(Lam, H.T @ y / r)
    ivon = IVON(learning_rate=0.05, ess=N, beta1=0.9, beta2=0.999, mc_samples=32, seed=1)
    f = OnlineFilter(Linear(2), Gaussian(r), ivon, prior=Prior(prior_var, bias_variance=prior_var))
    state = f.init(dtype=F64)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    precisions = []
    for epoch in range(400):
        state, _ = f.run(state, Xt, yt)
        if epoch >= 200:  # the Hessian estimate is noisy: average its second half
            precisions.append((N * (state.hess + state.delta)).numpy())
    np.testing.assert_allclose(state.mean.numpy(), mu, rtol=0.02, atol=0.02)
    np.testing.assert_allclose(np.mean(precisions, 0), np.diag(Lam), rtol=0.05)
    # what it is not: 1 / the marginal variances, for the two correlated weights
    marginal = 1 / np.diag(np.linalg.inv(Lam))[:2]
    assert np.all(np.abs(np.mean(precisions, 0)[:2] - marginal) / marginal > 0.5)


def _spec(**filter_: Any) -> dict[str, Any]:
    return {
        "name": "ivon",
        "network": {"type": "mlp", "input_dim": 10, "hidden": [16], "activation": "tanh"},
        "likelihood": {"type": "gaussian", "noise_variance": 0.5},
        "filter": {"type": "ivon", "ess": 442, **filter_},
        "prior": {"variance": 1.0},
        "dtype": "float64",
    }


def test_ivon_learns_diabetes_online_and_replays(app_client: MakeAppClient) -> None:
    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    f = build_filter(ModelSpec.model_validate(_spec(mc_samples=2)))
    state = f.init(dtype=F64)
    errors = []
    for i in range(len(y)):
        state, info = f.step(state, torch.tensor(X[i]), torch.tensor([y[i]]))
        errors.append((float(info.predictive.mean[0, 0]) - y[i]) ** 2)
    first, last = np.mean(errors[:100]), np.mean(errors[-100:])
    # it learns: the last rows' squared error under the first rows' and well under y's
    # variance (1; a linear model's residual variance on diabetes is about 0.5)
    assert last < first and last < 0.7
    with app_client() as c:  # the same steps through the service, bit for bit
        assert c.post("/v1/models", json=_spec(mc_samples=2)).status_code == 201
        got = c.post("/v1/models/ivon/update", json={"x": X[:50].tolist(), "y": y[:50].tolist()})
        assert got.status_code == 200
        s = f.init(dtype=F64)
        lls = []
        for i in range(50):
            s, info = f.step(s, torch.tensor(X[i]), torch.tensor([y[i]]))
            lls.append(float(info.log_likelihood))
        assert got.json()["log_likelihood"] == lls
        pred = c.post("/v1/models/ivon/predict", json={"x": X[:3].tolist()}).json()
        assert pred["point_estimate"] is False and min(pred["epistemic_variance"][0]) > 0
