"""LoFi against the full-covariance EKF, the diagonal EKF and dense Gaussians.

Independent answers: the dense EKF (rank >= steps x outputs keeps everything), VDEKF (rank 0), the
dense gamma^2 Sigma + q I, and torch.distributions.MultivariateNormal built from the dense precision.
Monte Carlo checks use Bonferroni-corrected exact tests with an overall false-alarm rate of 1e-3
per test (the seeds are fixed, so a pass is reproducible).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch.distributions import MultivariateNormal

from service.filters import (
    EKF,
    MLP,
    Categorical,
    Diagonal,
    Dynamics,
    Gaussian,
    Kalman,
    Linear,
    LoFi,
    LoFiState,
    OnlineFilter,
    Prior,
)

F64 = torch.float64
ALPHA = 1e-3


def _stream(T: int, I: int, C: int, classes: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, I, dtype=F64, generator=g)
    if classes:
        return X, torch.randint(0, C, (T,), generator=g).to(F64)
    return X, torch.randn(T, C, dtype=F64, generator=g)


def _random_state(D: int, d: int, seed: int) -> LoFiState:
    g = torch.Generator().manual_seed(seed)
    return LoFiState(
        mean=torch.randn(D, dtype=F64, generator=g),
        W=torch.randn(d, D, dtype=F64, generator=g),
        upsilon=torch.rand(D, dtype=F64, generator=g) * 2 + 0.5,
    )


CASES = [
    ("gaussian", Gaussian((0.3, 0.6)), 2, False),
    ("categorical", Categorical(), 3, True),
]


@pytest.mark.parametrize(("name", "likelihood", "C", "classes"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize(("gamma", "q"), [(1.0, 0.0), (0.97, 0.0), (1.0, 0.01), (0.95, 0.03)])
def test_full_rank_lofi_equals_ekf(name, likelihood, C, classes, gamma, q) -> None:  # type: ignore[no-untyped-def]
    T = 8
    net = MLP(input_dim=3, hidden=(5,), output_dim=C, activation="tanh")
    X, Y = _stream(T, 3, C, classes, seed=5)
    kw = {"network": net, "likelihood": likelihood, "dynamics": Dynamics(gamma, q)}
    ekf = OnlineFilter(algorithm=EKF(), prior=Prior(0.5), **kw)
    lofi = OnlineFilter(algorithm=LoFi(rank=T * C), prior=Prior(0.5), **kw)
    se, sl = ekf.init(F64), lofi.init(F64)
    Ye, Yl = ekf.encode(Y), lofi.encode(Y)
    for t in range(T):
        se, ie = ekf.step(se, X[t], Ye[t])
        sl, il = lofi.step(sl, X[t], Yl[t])
        torch.testing.assert_close(sl.mean, se.mean, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(lofi.algorithm.covariance(sl), se.cov, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(il.predictive.mean, ie.predictive.mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(il.log_likelihood, ie.log_likelihood, rtol=1e-9, atol=0)


@pytest.mark.parametrize(("name", "likelihood", "C", "classes"), CASES, ids=[c[0] for c in CASES])
def test_rank_zero_lofi_equals_diagonal(name, likelihood, C, classes) -> None:  # type: ignore[no-untyped-def]
    T = 40
    net = MLP(input_dim=4, hidden=(6,), output_dim=C, activation="relu")
    X, Y = _stream(T, 4, C, classes, seed=6)
    kw = {"network": net, "likelihood": likelihood, "dynamics": Dynamics(0.98, 0.01)}
    diag = OnlineFilter(algorithm=Diagonal(), prior=Prior(0.7), **kw)
    lofi = OnlineFilter(algorithm=LoFi(rank=0), prior=Prior(0.7), **kw)
    sd, _ = diag.run(diag.init(F64), X, Y)
    s0, _ = lofi.run(lofi.init(F64), X, Y)
    torch.testing.assert_close(s0.mean, sd.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(1 / s0.upsilon, sd.var, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("gamma", "q"), [(1.0, 0.0), (0.9, 0.0), (1.0, 0.2), (0.8, 0.05)])
def test_lofi_predict_is_exact(gamma: float, q: float) -> None:
    lofi = LoFi(rank=4)
    state = _random_state(D=12, d=4, seed=7)
    pred = lofi.predict(state, gamma, q)
    Sigma = lofi.covariance(state)
    expected = gamma**2 * Sigma + q * torch.eye(12, dtype=F64)
    torch.testing.assert_close(lofi.covariance(pred), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pred.mean, gamma * state.mean, rtol=0, atol=0)


def test_truncation_keeps_the_precision_diagonal() -> None:
    """diag(Upsilon_+) + diag(W_+^T W_+) equals the diagonal of the untruncated precision."""
    net = Linear(input_dim=20, output_dim=3)
    f = OnlineFilter(net, Gaussian(0.5), LoFi(rank=2), prior=Prior(1.0))
    state = f.init(F64)
    X, Y = _stream(10, 20, 3, False, seed=8)
    for t in range(10):
        prev = state
        state, _ = f.step(state, X[t], Y[t])
        _, J = net.jacobian(prev.mean, X[t : t + 1])
        H = J[0] / math.sqrt(0.5)
        exact = prev.upsilon + (prev.W**2).sum(0) + (H**2).sum(0)
        torch.testing.assert_close(state.upsilon + (state.W**2).sum(0), exact, rtol=1e-12, atol=0)


def test_predictive_variance_matches_dense_mvn() -> None:
    net = MLP(input_dim=3, hidden=(4,), output_dim=2, activation="tanh")
    D = net.num_params
    lofi = LoFi(rank=5)
    state = _random_state(D, 5, seed=9)
    f = OnlineFilter(net, Gaussian(0.25), lofi)
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(10))
    pred = f.predictive(state, x)
    mvn = MultivariateNormal(state.mean, precision_matrix=lofi.precision(state))
    _, J = net.jacobian(state.mean, x)
    dense = torch.einsum("ncd,de,nke->nck", J, mvn.covariance_matrix, J).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(pred.epistemic, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred.aleatoric, torch.full_like(dense, 0.25), rtol=0, atol=0)
    torch.testing.assert_close(pred.mean, net.apply(state.mean, x), rtol=0, atol=0)


def _check_samples(draws: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Exact tests on the sample mean and on the sample variance along fixed directions.

    Per coordinate: z = (xbar - m) / sqrt(Sigma_ii / n) ~ N(0, 1); along K random directions u:
    (n - 1) s_u^2 / (u^T Sigma u) ~ chi^2_{n-1}. Bonferroni over D + K tests at level ALPHA.
    """
    n, D = draws.shape
    K = 20
    U = torch.randn(K, D, dtype=F64, generator=torch.Generator().manual_seed(11))
    alpha = ALPHA / (D + K)
    z = (draws.mean(0) - mean) / torch.sqrt(cov.diagonal() / n)
    assert float(z.abs().max()) < stats.norm.ppf(1 - alpha / 2)
    proj = draws @ U.T
    ratio = (n - 1) * proj.var(0) / torch.einsum("kd,de,ke->k", U, cov, U)
    lo, hi = stats.chi2.ppf(alpha / 2, n - 1), stats.chi2.ppf(1 - alpha / 2, n - 1)
    assert float(ratio.min()) > lo
    assert float(ratio.max()) < hi


def test_lofi_samples_follow_the_dense_posterior() -> None:
    lofi = LoFi(rank=3)
    state = _random_state(D=15, d=3, seed=12)
    draws = lofi.sample(state, 40_000, torch.Generator().manual_seed(13))
    mvn = MultivariateNormal(state.mean, precision_matrix=lofi.precision(state))
    _check_samples(draws, state.mean, mvn.covariance_matrix)


@pytest.mark.parametrize(
    "algorithm", [EKF(), Diagonal(), LoFi(rank=0)], ids=["ekf", "diag", "lofi0"]
)
def test_other_samplers_follow_their_posterior(algorithm) -> None:  # type: ignore[no-untyped-def]
    f = OnlineFilter(Linear(4, 2), Gaussian(0.5), algorithm, prior=Prior(0.8))
    X, Y = _stream(6, 4, 2, False, seed=14)
    state, _ = f.run(f.init(F64), X, Y)
    draws = f.sample(state, 40_000, torch.Generator().manual_seed(15))
    _check_samples(draws, state.mean, algorithm.covariance(state))


@pytest.mark.parametrize(
    "algorithm", [Kalman(), LoFi(rank=2), Diagonal()], ids=["kalman", "lofi", "diag"]
)
def test_linear_thompson_outputs_follow_the_joint_predictive(algorithm) -> None:  # type: ignore[no-untyped-def]
    """A linear network's Thompson draws are taken in output space: N C jointly Gaussian values
    with mean g(m, x) and covariance J Sigma J^T from the dense Sigma; duplicate rows draw alike."""
    net = Linear(4, 2)
    f = OnlineFilter(net, Gaussian(0.5), algorithm, prior=Prior(0.8))
    assert f.network.linear_in_params
    X, Y = _stream(6, 4, 2, False, seed=19)
    state, _ = f.run(f.init(F64), X, Y)
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(20))
    x = torch.cat([x, x[:1]])  # row 3 repeats row 0
    out = f.sample_outputs(state, x, 40_000, torch.Generator().manual_seed(21))
    assert out.shape == (40_000, 4, 2)
    torch.testing.assert_close(out[:, 3], out[:, 0], rtol=0, atol=0)
    g, J = net.jacobian(state.mean, x[:3])
    J = J.reshape(6, -1)
    _check_samples(
        out[:, :3].reshape(40_000, 6), g.reshape(6), J @ algorithm.covariance(state) @ J.T
    )


def test_float32_truncation_keeps_the_float64_answer() -> None:
    """The Gram-eigendecomposition truncation in float32 tracks the float64 run (50 steps, D ~ 2e3)."""
    net = Linear(input_dim=400, output_dim=5)
    f = OnlineFilter(net, Gaussian(0.5), LoFi(rank=10), Dynamics(0.999, 1e-4), Prior(1.0))
    X, Y = _stream(50, 400, 5, False, seed=16)
    s64, _ = f.run(f.init(torch.float64), X, Y)
    s32, _ = f.run(f.init(torch.float32), X.float(), Y.float())
    probe = torch.randn(30, 400, dtype=F64, generator=torch.Generator().manual_seed(17))
    p64 = f.predictive(s64, probe)
    p32 = f.predictive(s32, probe.float())

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b).abs().max() / b.abs().max())

    assert rel(s32.upsilon, s64.upsilon) < 1e-5
    assert rel(s32.mean, s64.mean) < 1e-4
    assert rel(p32.epistemic, p64.epistemic) < 1e-4
    assert rel(s32.W.double().mT @ s32.W.double(), s64.W.mT @ s64.W) < 1e-4


def test_thompson_draws_share_one_theta_across_rows() -> None:
    net = MLP(input_dim=2, hidden=(3,), output_dim=1)
    f = OnlineFilter(net, Gaussian(1.0), LoFi(rank=2))
    state = f.init(F64)
    x = torch.tensor([[0.3, -1.0], [2.0, 0.5], [0.3, -1.0]], dtype=F64)
    out = f.sample_outputs(state, x, 64, torch.Generator().manual_seed(18))
    assert out.shape == (64, 3, 1)
    torch.testing.assert_close(out[:, 0], out[:, 2], rtol=0, atol=0)
    thetas = f.sample(state, 64, torch.Generator().manual_seed(18))
    torch.testing.assert_close(out, net.apply(thetas, x), rtol=0, atol=0)


@pytest.mark.parametrize(("name", "likelihood", "C", "classes"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("gamma", [1.0, 0.97])
def test_orthogonal_truncation_equals_the_full_gram(name, likelihood, C, classes, gamma) -> None:  # type: ignore[no-untyped-def]
    """Without process noise W's rows stay orthogonal, so taking W W^T as the diagonal of their
    squared norms (``orthogonal``) gives the full Gram product's states and reports."""
    net = MLP(input_dim=4, hidden=(8,), output_dim=C, activation="tanh")
    X, Y = _stream(60, 4, C, classes, seed=21)
    kw = {"network": net, "likelihood": likelihood, "dynamics": Dynamics(gamma, 0.0)}
    full = OnlineFilter(algorithm=LoFi(rank=3), prior=Prior(0.5), **kw)
    ortho = OnlineFilter(algorithm=LoFi(rank=3, orthogonal=True), prior=Prior(0.5), **kw)
    sf, sq = full.init(F64), ortho.init(F64)
    Yf = full.encode(Y)
    for t in range(60):
        sf, inf = full.step(sf, X[t], Yf[t])
        sq, inq = ortho.step(sq, X[t], Yf[t])
        WWt = sq.W @ sq.W.mT
        off = WWt - torch.diag(WWt.diagonal())
        assert float(off.abs().max()) <= 1e-12 * float(WWt.diagonal().max())
        torch.testing.assert_close(sq.mean, sf.mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sq.upsilon, sf.upsilon, rtol=1e-9, atol=0)
        torch.testing.assert_close(sq.W.mT @ sq.W, sf.W.mT @ sf.W, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(inq.log_likelihood, inf.log_likelihood, rtol=1e-9, atol=0)


def test_orthogonal_lofi_is_set_without_process_noise_and_refused_with_it() -> None:
    from service.components.build import build_filter
    from service.errors import InvalidSpec
    from service.schemas import ModelSpec

    def spec(**dynamics: object) -> ModelSpec:
        return ModelSpec.model_validate(
            {
                "name": "m",
                "network": {"type": "mlp", "input_dim": 3, "hidden": [4], "output_dim": 1},
                "likelihood": {"type": "gaussian"},
                "filter": {"type": "lofi", "rank": 2},
                "dynamics": dynamics,
            }
        )

    def orthogonal(s: ModelSpec) -> bool:
        algorithm = build_filter(s).algorithm
        assert isinstance(algorithm, LoFi)
        return algorithm.orthogonal

    assert orthogonal(spec()) and orthogonal(spec(decay=0.9))
    assert not orthogonal(spec(process_noise=1e-4))
    assert not orthogonal(spec(decay=0.9, steady_state=True))
    with pytest.raises(InvalidSpec, match="orthogonal"):
        OnlineFilter(
            MLP(input_dim=3, hidden=(4,), output_dim=1),
            Gaussian(1.0),
            LoFi(rank=2, orthogonal=True),
            Dynamics(1.0, 1e-3),
        )
