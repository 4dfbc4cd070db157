"""Calibration trackers and the predictive CDFs behind them, against independent answers.

* the PIT of each likelihood against scipy (gaussian: the normal CDF; poisson: the
  Poisson-lognormal CDF by adaptive quadrature);
* coverage, PIT histogram, residuals, Brier and ECE against the same figures computed directly
  with numpy from the raw predictions, on simulated data whose truth is known;
* under a calibrated forecast the figures sit within binomial error of their nominal values, and
  a forecast with a 4x too small variance is caught;
* the window slides, merges exactly, and survives a round trip through its JSON form.

Monte Carlo checks use bounds of 5 standard errors (false-alarm rate about 6e-7 each).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from service.calibration import (
    BINS,
    LEVELS,
    CalibrationTracker,
    Observation,
    Stats,
    gaussian_pit,
)
from service.filters import Bernoulli, Categorical, Gaussian, Poisson

Z = 5.0  # standard errors allowed in Monte Carlo checks


def _binomial_ok(share: float, p: float, n: int) -> bool:
    return abs(share - p) <= Z * math.sqrt(p * (1 - p) / n)


# -- predictive CDFs -----------------------------------------------------------------------------


def test_gaussian_pit_is_the_normal_cdf_of_the_predictive() -> None:
    rng = np.random.default_rng(0)
    eta = torch.tensor(rng.normal(size=(6, 3)), dtype=torch.float64)
    A = torch.tensor(rng.normal(size=(6, 3, 3)), dtype=torch.float64)
    var_eta = A @ A.mT
    y = torch.tensor(rng.normal(size=(6, 3)), dtype=torch.float64)
    r = (0.5, 1.5, 2.0)
    lo, hi = Gaussian(r).pit(y, eta, var_eta)
    sd = np.sqrt(np.diagonal(var_eta.numpy(), axis1=1, axis2=2) + np.array(r))
    want = stats.norm.cdf(y.numpy(), loc=eta.numpy(), scale=sd)
    np.testing.assert_allclose(lo.numpy(), want, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(lo.numpy(), hi.numpy())
    assert gaussian_pit(1.3, 0.2, 2.5) == pytest.approx(stats.norm.cdf(1.3, 0.2, math.sqrt(2.5)))


@pytest.mark.parametrize(
    ("g", "v", "y"),
    [
        (0.3, 0.2, 0),
        (1.5, 0.05, 4),
        (-1.0, 1.0, 2),
        (2.5, 0.5, 30),
        (4.0, 1.0, 60),
        (6.9, 1e-4, 1000),
    ],
)
def test_poisson_pit_is_the_poisson_lognormal_cdf(g: float, v: float, y: int) -> None:
    def cdf(k: int) -> float:
        if k < 0:
            return 0.0
        value, _ = integrate.quad(
            lambda e: stats.poisson.cdf(k, math.exp(e)) * stats.norm.pdf(e, g, math.sqrt(v)),
            g - 12 * math.sqrt(v),
            g + 12 * math.sqrt(v),
            points=[math.log(k + 1)] if abs(math.log(k + 1) - g) < 12 * math.sqrt(v) else None,
            epsabs=1e-13,
            epsrel=1e-11,
            limit=500,
        )
        return float(value)

    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    lo, hi = Poisson().pit(t([[float(y)]]), t([[g]]), t([[[v]]]))
    assert float(lo) == pytest.approx(cdf(y - 1), abs=1e-8)
    assert float(hi) == pytest.approx(cdf(y), abs=1e-8)


def test_class_labels_have_no_pit() -> None:
    eta, var = torch.zeros(1, 3), torch.eye(3).unsqueeze(0)
    assert Categorical().pit(torch.tensor([[0.0, 1.0, 0.0]]), eta, var) is None
    assert Bernoulli().pit(torch.ones(1, 1), eta[:, :1], var[:, :1, :1]) is None


# -- gaussian: coverage, PIT, residuals ----------------------------------------------------------


def _gaussian_stats(y: np.ndarray, mean: np.ndarray, var: np.ndarray) -> Stats:
    s = Stats()
    for yi, mi, vi in zip(y, mean, var, strict=True):
        u = gaussian_pit(yi, mi, vi)
        nll = 0.5 * (math.log(2 * math.pi * vi) + (yi - mi) ** 2 / vi)
        s.add(Observation(nll=nll, pit=[(u, u)], z=[(yi - mi) / math.sqrt(vi)]))
    return s


def test_gaussian_figures_match_a_direct_computation() -> None:
    rng = np.random.default_rng(1)
    n = 3000
    mean, var = rng.normal(size=n), rng.uniform(0.2, 3.0, size=n)
    y = mean + np.sqrt(var) * rng.normal(size=n) * 1.3 + 0.2  # miscalibrated on purpose
    s = _gaussian_stats(y, mean, var)
    z = (y - mean) / np.sqrt(var)
    for level in LEVELS:
        half = stats.norm.ppf(0.5 + level / 2)
        assert s.coverage is not None
        assert s.coverage[level] == pytest.approx(np.mean(np.abs(z) <= half), abs=1e-12)
    counts, _ = np.histogram(stats.norm.cdf(z), bins=BINS, range=(0, 1))
    np.testing.assert_allclose(s.pit_histogram or [], counts / n, atol=1e-12)
    assert s.residual_mean == pytest.approx(z.mean(), rel=1e-10)
    assert s.residual_variance == pytest.approx(z.var(), rel=1e-10)
    assert s.nll == pytest.approx(-stats.norm.logpdf(y, mean, np.sqrt(var)).mean(), rel=1e-10)


def test_calibrated_gaussian_covers_its_levels_and_a_4x_small_variance_does_not() -> None:
    rng = np.random.default_rng(2)
    n = 4000
    mean, var = rng.normal(size=n), rng.uniform(0.5, 2.0, size=n)
    y = mean + np.sqrt(var) * rng.normal(size=n)
    good = _gaussian_stats(y, mean, var)
    bad = _gaussian_stats(y, mean, var / 4)
    assert good.coverage is not None and bad.coverage is not None
    for level in LEVELS:
        assert _binomial_ok(good.coverage[level], level, n), (level, good.coverage)
        # sd half the truth: the interval covers P(|N(0,1)| <= z_level / 2)
        expected = 2 * stats.norm.cdf(stats.norm.ppf(0.5 + level / 2) / 2) - 1
        assert _binomial_ok(bad.coverage[level], expected, n), (level, bad.coverage)
    assert all(_binomial_ok(p, 1 / BINS, n) for p in good.pit_histogram or [])
    assert bad.residual_variance == pytest.approx(4.0, rel=0.1)
    assert good.residual_variance == pytest.approx(1.0, rel=0.1)


# -- poisson: the non-randomised PIT ---------------------------------------------------------------


def test_count_pit_is_uniform_and_covers_nominal_where_quantile_intervals_over_cover() -> None:
    rng = np.random.default_rng(3)
    n, rate = 20_000, 2.3
    y = rng.poisson(rate, size=n)
    s = Stats()
    for k in y:
        s.add(
            Observation(nll=0.0, pit=[(stats.poisson.cdf(k - 1, rate), stats.poisson.cdf(k, rate))])
        )
    assert s.coverage is not None
    for level in LEVELS:
        assert _binomial_ok(s.coverage[level], level, n), (level, s.coverage)
        lo, hi = stats.poisson.ppf([0.5 - level / 2, 0.5 + level / 2], rate)
        plain = float(np.mean((y >= lo) & (y <= hi)))
        assert plain > level + 0.02  # what the non-randomised PIT avoids
    assert all(_binomial_ok(p, 1 / BINS, n) for p in s.pit_histogram or [])
    assert sum(s.pit_histogram or []) == pytest.approx(1.0)


# -- classes: Brier, log loss, ECE --------------------------------------------------------------


def _ece(conf: np.ndarray, hit: np.ndarray) -> float:
    b = np.minimum((conf * BINS).astype(int), BINS - 1)
    total = 0.0
    for k in range(BINS):
        m = b == k
        if m.any():
            total += m.sum() / len(conf) * abs(hit[m].mean() - conf[m].mean())
    return total


def test_bernoulli_figures_match_a_direct_computation_and_detect_overconfidence() -> None:
    rng = np.random.default_rng(4)
    n = 5000
    p = rng.uniform(0, 1, size=n)
    y = (rng.uniform(size=n) < p).astype(int)
    good, over = Stats(), Stats()
    sharp = 1 / (1 + np.exp(-3 * np.log(p / (1 - p))))  # logits tripled: overconfident
    for pi, qi, yi in zip(p, sharp, y, strict=True):
        good.add(Observation(nll=-math.log(pi if yi else 1 - pi), probs=[pi], label=int(yi)))
        over.add(Observation(nll=-math.log(qi if yi else 1 - qi), probs=[qi], label=int(yi)))
    assert good.brier == pytest.approx(np.mean((p - y) ** 2), rel=1e-10)
    assert good.log_loss == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert good.ece == pytest.approx(_ece(p, y.astype(float)), abs=1e-12)
    assert over.ece == pytest.approx(_ece(sharp, y.astype(float)), abs=1e-12)
    assert good.ece is not None and over.ece is not None
    assert good.ece < 0.03 < 0.1 < over.ece
    rel = good.reliability()
    assert sum(int(b["count"] or 0) for b in rel) == n


def test_categorical_uses_top_label_confidence_and_multiclass_brier() -> None:
    rng = np.random.default_rng(5)
    n, K = 3000, 4
    logits = rng.normal(size=(n, K)) * 2
    P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(K, p=row) for row in P])
    s = Stats()
    for row, label in zip(P, y, strict=True):
        s.add(Observation(nll=-math.log(row[label]), probs=row.tolist(), label=int(label)))
    onehot = np.eye(K)[y]
    assert s.brier == pytest.approx(np.mean(((P - onehot) ** 2).sum(1)), rel=1e-10)
    conf, hit = P.max(1), (P.argmax(1) == y).astype(float)
    assert s.ece == pytest.approx(_ece(conf, hit), abs=1e-12)


# -- the window -------------------------------------------------------------------------------------


def _obs(rng: np.random.Generator) -> Observation:
    u = float(rng.uniform())
    z = float(stats.norm.ppf(u))
    return Observation(nll=float(rng.exponential()), pit=[(u, u)], z=[z])


def test_window_slides_by_bucket_and_equals_the_stats_of_its_last_observations() -> None:
    rng = np.random.default_rng(6)
    tracker = CalibrationTracker(window=100, buckets=10, history=5)
    seen = [_obs(rng) for _ in range(347)]
    for v, o in enumerate(seen, start=1):
        tracker.observe(o, v)
    window = tracker.stats()
    assert window.n == 97  # 9 closed buckets of 10, plus 7 in the open one
    direct = Stats()
    for o in seen[-97:]:
        direct.add(o)
    assert window.n == direct.n
    assert window.nll == pytest.approx(direct.nll, rel=1e-12)
    assert window.coverage == pytest.approx(direct.coverage, rel=1e-12)
    assert window.pit_histogram == pytest.approx(direct.pit_histogram, rel=1e-12)
    assert [v for v, _ in tracker.history] == [300, 310, 320, 330, 340]


def test_stats_merge_is_the_stats_of_the_union() -> None:
    rng = np.random.default_rng(7)
    a_obs, b_obs = [_obs(rng) for _ in range(40)], [_obs(rng) for _ in range(25)]
    a, b, both = Stats(), Stats(), Stats()
    for o in a_obs:
        a.add(o)
        both.add(o)
    for o in b_obs:
        b.add(o)
        both.add(o)
    merged = a + b
    for key, value in both.to_dict().items():
        assert getattr(merged, key) == pytest.approx(value, rel=1e-12), key


def test_tracker_round_trips_through_json() -> None:
    rng = np.random.default_rng(8)
    tracker = CalibrationTracker(window=50, buckets=5)
    for v in range(1, 133):
        tracker.observe(_obs(rng), v)
    again = CalibrationTracker.from_dict(json.loads(json.dumps(tracker.to_dict())))
    assert again.stats().to_dict() == tracker.stats().to_dict()
    assert [(v, s.to_dict()) for v, s in again.history] == [
        (v, s.to_dict()) for v, s in tracker.history
    ]
    for v in range(133, 160):  # and keeps sliding the same way
        o = _obs(rng)
        tracker.observe(o, v)
        again.observe(o, v)
    assert again.stats().to_dict() == tracker.stats().to_dict()


def test_a_taken_window_does_not_move_with_later_rows() -> None:
    """A snapshot takes ``to_dict`` with its state and encodes it later: rows observed in
    between must not reach it (the open bucket's coverage and PIT lists were once shared, so a
    restart replayed those rows into them a second time: coverage above 1)."""
    rng = np.random.default_rng(9)
    tracker = CalibrationTracker(window=50, buckets=5)
    for v in range(1, 24):
        tracker.observe(_obs(rng), v)
    taken = tracker.to_dict()
    frozen = json.dumps(taken)
    for v in range(24, 31):  # within the same open bucket
        tracker.observe(_obs(rng), v)
    assert json.dumps(taken) == frozen
    again = CalibrationTracker.from_dict(json.loads(frozen))
    for v in range(24, 31):  # replayed after a restart, as the log does
        again.observe(_obs(np.random.default_rng(v)), v)
    assert all(c <= s.n for s in (again.stats(),) for c in s.covered)
