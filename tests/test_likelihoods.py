"""Moment matching (H = V J) against hand-computed EKF steps, and the predictives against quadrature.

Independent answers: H from autodiff of the mean function mu(g(theta, x)), the dense EKF algebra in
NumPy, scipy's quadrature and densities.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.func import jacrev

from service.filters import (
    EKF,
    MLP,
    Bernoulli,
    Categorical,
    Diagonal,
    Gaussian,
    Linear,
    LoFi,
    OnlineFilter,
    Poisson,
    Prior,
)
from service.filters.linalg import settle

F64 = torch.float64


def _dense_ekf(m, P, H, R, y, yhat):  # type: ignore[no-untyped-def]
    S = H @ P @ H.T + R
    K = P @ H.T @ np.linalg.inv(S)
    return m + K @ (y - yhat), P - K @ S @ K.T


CASES = [  # iterations=0: the moment-matched EKF update (the iterated one: tests/test_counts.py)
    ("bernoulli", Bernoulli(iterations=0), 1, torch.tensor([1.0])),
    ("categorical", Categorical(iterations=0), 4, torch.tensor([2.0])),
    ("poisson", Poisson(iterations=0), 1, torch.tensor([3.0])),
]


@pytest.mark.parametrize(("name", "likelihood", "C", "y"), CASES, ids=[c[0] for c in CASES])
def test_update_uses_the_moment_matched_jacobian(name, likelihood, C, y) -> None:  # type: ignore[no-untyped-def]
    """One EKF step equals the dense update with H = d mu(g(theta, x)) / d theta (autodiff) and
    R = V at the predicted mean, and differs by O(1) from the logit-Jacobian update (H = J)."""
    net = MLP(input_dim=3, hidden=(5,), output_dim=C, activation="tanh")
    f = OnlineFilter(net, likelihood, EKF(), prior=Prior(0.5, seed=3))
    state = f.init(F64)
    x = torch.tensor([0.4, -1.2, 0.7], dtype=F64)
    yy = f.encode(y)[0]
    new, _ = f.update(state, x, yy)

    m = state.mean
    eta = net.apply(m, x[None])[0]
    mu = likelihood.mean(eta)
    H = jacrev(lambda t: likelihood.mean(net.apply(t, x[None])[0]))(m)
    J = jacrev(lambda t: net.apply(t, x[None])[0])(m)
    if name == "categorical":
        V = torch.diag(mu) - torch.outer(mu, mu)
        R = V + 1e-3 * torch.eye(C, dtype=F64)
    else:
        V = torch.diag(likelihood.variance_diag(eta))
        R = V
    args = [t.numpy() for t in (m, state.cov)]
    m_mm, P_mm = _dense_ekf(*args, H.numpy(), R.numpy(), yy.numpy(), mu.numpy())
    np.testing.assert_allclose(new.mean.numpy(), m_mm, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(new.cov.numpy(), P_mm, rtol=1e-10, atol=1e-12)

    # The pitfall: linearising the logit (H = J, R = V) gives a visibly different posterior.
    m_lg, _ = _dense_ekf(*args, J.numpy(), R.numpy(), yy.numpy(), mu.numpy())
    assert np.abs(m_lg - m_mm).max() > 1e-2 * np.abs(m_mm - m.numpy()).max() + 1e-3


def test_categorical_r_is_non_singular_and_a_10_class_stream_stays_finite() -> None:
    """2,000 steps of a 10-class softmax problem: finite posterior, and it learns the teacher."""
    lin = Categorical().linearize(
        torch.tensor([5.0, -3.0, 0.0], dtype=F64), torch.eye(3, dtype=F64)
    )
    assert float(torch.linalg.eigvalsh(lin.R).min()) >= 1e-3 * (1 - 1e-9)

    g = torch.Generator().manual_seed(20)
    I, K, T = 6, 10, 2000
    teacher = torch.randn(K, I, dtype=F64, generator=g) * 2
    X = torch.randn(T, I, dtype=F64, generator=g)
    Y = torch.multinomial(torch.softmax(X @ teacher.T, -1), 1, generator=g)[:, 0].to(F64)
    for algorithm in (LoFi(rank=5), Diagonal()):
        f = OnlineFilter(Linear(I, K), Categorical(), algorithm, prior=Prior(1.0))
        state, infos = f.run(f.init(F64), X, Y)
        settle(algorithm.validity(state))
        hits = [int(i.predictive.mean.argmax()) == int(Y[t]) for t, i in enumerate(infos)]
        bayes = (X[1000:] @ teacher.T).argmax(-1) == Y[1000:].long()
        # The last 1,000 progressive predictions come close to the teacher's own accuracy.
        assert np.mean(hits[1000:]) > float(bayes.double().mean()) - 0.1


def test_gaussian_log_predictive_is_the_multivariate_density() -> None:
    lik = Gaussian((0.5, 2.0))
    eta = torch.tensor([[0.3, -1.0]], dtype=F64)
    A = torch.tensor([[1.0, 0.4], [0.4, 0.8]], dtype=F64)[None]
    y = torch.tensor([[1.0, 0.5]], dtype=F64)
    got = float(lik.log_predictive(y, eta, A)[0])
    S = A[0].numpy() + np.diag([0.5, 2.0])
    assert got == pytest.approx(
        stats.multivariate_normal(eta[0].numpy(), S).logpdf(y[0]), rel=1e-12
    )


@pytest.mark.parametrize(("g", "v"), [(0.3, 0.5), (-2.0, 2.0), (1.5, 0.01), (3.0, 4.0)])
def test_poisson_predictive_is_the_lognormal_mixture(g: float, v: float) -> None:
    lik = Poisson()
    pred = lik.predictive(torch.tensor([[g]], dtype=F64), torch.tensor([[[v]]], dtype=F64))
    dens = stats.norm(g, math.sqrt(v)).pdf
    lo, hi = g - 12 * math.sqrt(v), g + 12 * math.sqrt(v)
    Erate = integrate.quad(lambda e: math.exp(e) * dens(e), lo, hi)[0]
    Erate2 = integrate.quad(lambda e: math.exp(2 * e) * dens(e), lo, hi)[0]
    assert float(pred.mean[0, 0]) == pytest.approx(Erate, rel=1e-8)
    assert float(pred.epistemic[0, 0]) == pytest.approx(Erate2 - Erate**2, rel=1e-7)
    assert float(pred.variance[0, 0]) == pytest.approx(Erate2 - Erate**2 + Erate, rel=1e-7)
    for y in (0, 2, 7, 40):
        exact = integrate.quad(
            lambda e, y=y: stats.poisson(math.exp(e)).pmf(y) * dens(e),
            lo,
            hi,
            points=[g + k * math.sqrt(v) for k in (-3, -1, 0, 1, 3)] + [math.log(y + 0.5)],
            epsabs=0,
            epsrel=1e-12,
            limit=500,
        )[0]
        got = lik.log_predictive(
            torch.tensor([[float(y)]], dtype=F64),
            torch.tensor([[g]], dtype=F64),
            torch.tensor([[[v]]], dtype=F64),
        )
        assert float(got[0]) == pytest.approx(math.log(exact), abs=1e-9)


def _poisson_lognormal_log_mass(y: int, g: float, v: float) -> float:
    """log of the integral of Poisson(y; exp(e)) N(e; g, v) de in 40-digit arithmetic (mpmath):
    Newton on the integrand's concave log for its mode, then tanh-sinh quadrature over 12 local
    sds around it (no cancellation, whatever v)."""
    if v <= 0:
        return float(stats.poisson(math.exp(g)).logpmf(y))
    mp = mpmath.mp.clone()
    mp.dps = 40
    G, V = mp.mpf(g), mp.mpf(v)

    def h(e: mpmath.mpf) -> mpmath.mpf:
        return (
            y * e
            - mp.exp(e)
            - mp.loggamma(y + 1)
            - (e - G) ** 2 / (2 * V)
            - mp.log(2 * mp.pi * V) / 2
        )

    top = mp.log(y + mp.mpf("0.5")) if y > 0 else G
    top = min(top, G + V * y)
    for _ in range(200):
        top = top + (y - mp.exp(top) - (top - G) / V) / (mp.exp(top) + 1 / V)
    sd = 1 / mp.sqrt(mp.exp(top) + 1 / V)
    peak = h(top)
    area = mp.quad(lambda z: mp.exp(h(top + sd * z) - peak), [-12, -3, 0, 3, 12])
    return float(peak + mp.log(area * sd))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("y", "g"), [(7, 2.0), (1, 2.0), (0, -1.0), (40, 3.5), (7, 21.1)])
def test_poisson_log_predictive_as_the_variance_vanishes(
    dtype: torch.dtype, y: int, g: float
) -> None:
    """From v = 0 (the exact pmf; a rounding -1.7e-18 counts as 0) through tiny and small v to the
    quadrature's range, the log predictive mass equals scipy's integral, in float64 and in float32
    (whose quadrature nodes would collapse onto the mean): never above 0, never NaN."""
    lik = Poisson()
    for v in (0.0, -1.7e-18, 1e-20, 1e-14, 1e-9, 1e-7, 1e-5, 1e-3):
        got = float(
            lik.log_predictive(
                torch.tensor([[float(y)]], dtype=dtype),
                torch.tensor([[g]], dtype=dtype),
                torch.tensor([[[v]]], dtype=dtype),
            )[0]
        )
        want = _poisson_lognormal_log_mass(y, g, max(v, 0.0))
        rel = 1e-9 if dtype == torch.float64 else 2e-6
        assert math.isfinite(got) and got <= 0
        assert got == pytest.approx(want, rel=rel, abs=rel), (v, got, want)


@pytest.mark.parametrize(("g", "v"), [(0.5, 0.3), (-1.0, 3.0), (2.5, 1.0)])
def test_bernoulli_probit_and_monte_carlo_predictives(g: float, v: float) -> None:
    """Probit approximation within 0.01 of the exact integral; Monte Carlo within 4.4 sigma (1e-5)."""
    dens = stats.norm(g, math.sqrt(v)).pdf
    exact = integrate.quad(lambda e: dens(e) / (1 + math.exp(-e)), g - 12 * v, g + 12 * v)[0]
    probit = Bernoulli().predictive(
        torch.tensor([[g]], dtype=F64), torch.tensor([[[v]]], dtype=F64)
    )
    assert abs(float(probit.mean[0, 0]) - exact) < 0.01
    assert float(probit.variance[0, 0]) == pytest.approx(
        float(probit.mean[0, 0]) * (1 - float(probit.mean[0, 0])), rel=1e-12
    )

    # A one-weight linear model whose belief is N(g, v) on the logit at x = 1.
    f = OnlineFilter(Linear(1, 1, bias=False), Bernoulli(), Diagonal(), prior=Prior(v))
    state = f.init(F64)
    state = type(state)(mean=torch.tensor([g], dtype=F64), var=state.var)
    n = 200_000
    mc = f.predictive(
        state,
        torch.ones(1, 1, dtype=F64),
        method="mc",
        num_samples=n,
        generator=torch.Generator().manual_seed(21),
    )
    sd = math.sqrt(exact * (1 - exact) / n)
    assert abs(float(mc.mean[0, 0]) - exact) < 4.4 * sd


@pytest.mark.parametrize(
    ("likelihood", "y", "match"),
    [
        (Bernoulli(), torch.tensor([2.0]), "0 or 1"),
        (Categorical(), torch.tensor([4.0]), "out of range"),
        (Categorical(), torch.tensor([1.5]), "integer"),
        (Poisson(), torch.tensor([-1.0]), "non-negative"),
        (Gaussian(1.0), torch.tensor([float("nan")]), "NaN"),
    ],
)
def test_targets_outside_the_support_are_named(likelihood, y, match) -> None:  # type: ignore[no-untyped-def]
    from service.errors import InvalidInput

    C = 4 if isinstance(likelihood, Categorical) else 1
    with pytest.raises(InvalidInput, match=match):
        likelihood.encode(y, C)
