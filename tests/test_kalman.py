"""The exact Kalman filter against closed forms, and the EKF against the Kalman filter.

Independent answers: the batch Bayesian linear-regression posterior (q = 0) and the last-time
marginal of the dense joint Gaussian over theta_1..T (q > 0), both computed in NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.filters import EKF, Dynamics, Gaussian, Kalman, Linear, OnlineFilter, Prior


def _design(x: np.ndarray, C: int, bias: bool) -> np.ndarray:
    """H (C, D) for one row in the flat nn.Linear order: weight (C x I) then bias."""
    blocks = [np.kron(np.eye(C), x[None, :])]
    if bias:
        blocks.append(np.eye(C))
    return np.concatenate(blocks, axis=1)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(("C", "noise"), [(1, 0.3), (2, (0.2, 1.5))])
def test_kalman_q0_equals_batch_blr(C: int, noise: float | tuple[float, ...]) -> None:
    rng = np.random.default_rng(1)
    I, T, s0 = 4, 500, 2.0
    mu0 = rng.normal(size=C * I + C)
    X = rng.normal(size=(T, I))
    Y = rng.normal(size=(T, C)) + X @ rng.normal(size=(I, C))
    f = OnlineFilter(
        Linear(I, C, bias=True),
        Gaussian(noise),
        Kalman(),
        prior=Prior(variance=s0, mean=torch.tensor(mu0)),
    )
    state, _ = f.run(f.init(torch.float64), torch.tensor(X), torch.tensor(Y))

    r = np.broadcast_to(np.asarray(noise, dtype=float), (C,))
    Rinv = np.diag(1 / r)
    Lam = np.eye(mu0.size) / s0
    eta = mu0 / s0
    for t in range(T):
        H = _design(X[t], C, True)
        Lam += H.T @ Rinv @ H
        eta += H.T @ Rinv @ Y[t]
    cov = np.linalg.inv(Lam)
    mean = cov @ eta
    assert _rel(state.mean.numpy(), mean) < 1e-8
    assert _rel(state.cov.numpy(), cov) < 1e-8


def test_kalman_q_positive_equals_dense_joint_marginal() -> None:
    rng = np.random.default_rng(2)
    I, T, s0, gamma, q, r = 3, 40, 1.5, 0.95, 0.05, 0.4
    D = I + 1
    mu0 = rng.normal(size=D)
    X = rng.normal(size=(T, I))
    Y = rng.normal(size=T)

    # Joint prior over theta_1..T: theta_t = gamma theta_{t-1} + w_t, theta_0 ~ N(mu0, s0 I).
    var = np.empty(T + 1)
    var[0] = s0
    for t in range(1, T + 1):
        var[t] = gamma**2 * var[t - 1] + q
    mean = np.concatenate([gamma**t * mu0 for t in range(1, T + 1)])
    cov = np.zeros((T * D, T * D))
    for s in range(1, T + 1):
        for t in range(s, T + 1):
            block = gamma ** (t - s) * var[s] * np.eye(D)
            cov[(s - 1) * D : s * D, (t - 1) * D : t * D] = block
            cov[(t - 1) * D : t * D, (s - 1) * D : s * D] = block
    H = np.zeros((T, T * D))
    for t in range(T):
        H[t, t * D : (t + 1) * D] = _design(X[t], 1, True)[0]
    S = H @ cov @ H.T + r * np.eye(T)
    K = cov @ H.T @ np.linalg.inv(S)
    post_mean = mean + K @ (Y - H @ mean)
    post_cov = cov - K @ S @ K.T
    last = slice((T - 1) * D, T * D)

    f = OnlineFilter(
        Linear(I, 1),
        Gaussian(r),
        Kalman(),
        Dynamics(decay=gamma, process_noise=q),
        Prior(variance=s0, mean=torch.tensor(mu0)),
    )
    state, _ = f.run(f.init(torch.float64), torch.tensor(X), torch.tensor(Y))
    assert _rel(state.mean.numpy(), post_mean[last]) < 1e-8
    assert _rel(state.cov.numpy(), post_cov[last, last]) < 1e-8


def test_kalman_log_likelihood_is_the_prediction_error_decomposition() -> None:
    """Sum of per-step log predictive densities = log N(Y; H mean, H cov H^T + R) of the joint."""
    rng = np.random.default_rng(3)
    I, T, s0, r = 2, 30, 1.0, 0.5
    X = rng.normal(size=(T, I))
    Y = rng.normal(size=T)
    f = OnlineFilter(Linear(I, 1, bias=False), Gaussian(r), Kalman(), prior=Prior(variance=s0))
    _, infos = f.run(f.init(torch.float64), torch.tensor(X), torch.tensor(Y))
    total = sum(float(i.log_likelihood) for i in infos)
    S = s0 * X @ X.T + r * np.eye(T)
    _, logdet = np.linalg.slogdet(S)
    exact = -0.5 * (Y @ np.linalg.solve(S, Y) + logdet + T * np.log(2 * np.pi))
    assert abs(total - exact) < 1e-9 * abs(exact)


def test_ekf_on_linear_gaussian_equals_kalman_step_by_step() -> None:
    rng = np.random.default_rng(4)
    I, C, T = 3, 2, 60
    X = torch.tensor(rng.normal(size=(T, I)))
    Y = torch.tensor(rng.normal(size=(T, C)))
    kw = {
        "network": Linear(I, C),
        "likelihood": Gaussian((0.3, 0.7)),
        "dynamics": Dynamics(decay=0.99, process_noise=0.02),
        "prior": Prior(variance=0.8),
    }
    kf, ekf = OnlineFilter(algorithm=Kalman(), **kw), OnlineFilter(algorithm=EKF(), **kw)
    sk, se = kf.init(torch.float64), ekf.init(torch.float64)
    for t in range(T):
        sk, ik = kf.step(sk, X[t], Y[t])
        se, ie = ekf.step(se, X[t], Y[t])
        torch.testing.assert_close(se.mean, sk.mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(se.cov, sk.cov, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            ie.predictive.variance, ik.predictive.variance, rtol=1e-10, atol=0
        )
        torch.testing.assert_close(ie.log_likelihood, ik.log_likelihood, rtol=1e-10, atol=0)
