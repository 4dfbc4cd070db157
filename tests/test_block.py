"""The block update of the exact Kalman filter (``docs/algorithms.md`` 3.7) against independent
truths.

- The row-by-row filter (``OnlineFilter.step`` on each row in turn): the same posterior and the
  same pre-update report for every row, to 1e-10 at float64; at float32, the float64 rows'
  answer to float32 rounding (the block computes in float64), and so the float32 rows' answer
  to their own rounding.
- In NumPy: the batch Bayesian linear-regression posterior, and the joint Gaussian of the rows'
  targets, N(H mu_0, sigma_0^2 H H^T + r I), whose conditional law of y_i given y_{<i} is row
  i's one-step-ahead predictive.
- Failures: the request's own bad numbers raise InvalidInput, and a block that fails raises the
  StepRejected the rows one at a time would (reason and message); the state is untouched.

Every case is seeded; nothing is random at test time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import Tensor

from service.errors import InvalidInput, PostserveError, StepRejected
from service.filters import (
    EKF,
    Dynamics,
    Gaussian,
    GaussState,
    Kalman,
    Linear,
    LoFi,
    OnlineFilter,
    Prior,
    StepInfo,
)
from service.filters import online as online_module
from service.filters.block import BLOCK_ROWS, applies

F64, F32 = torch.float64, torch.float32
KalmanFilter = OnlineFilter[GaussState]


def _filter(I: int = 4, bias: bool = True, noise: float = 0.3, s0: float = 1.5) -> KalmanFilter:
    mu0 = torch.tensor(np.random.default_rng(7).normal(size=I + int(bias)))
    return OnlineFilter(Linear(I, 1, bias), Gaussian(noise), Kalman(), prior=Prior(s0, mu0))


def _data(n: int, I: int, seed: int, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, I))
    y = x @ rng.normal(size=I) + 0.4 + 0.5 * rng.normal(size=n)
    return torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)


def _one_at_a_time(
    f: KalmanFilter, state: GaussState, x: Tensor, y: Tensor
) -> tuple[GaussState, list[StepInfo]]:
    """The row-by-row filter: ``step`` on each row in turn."""
    infos = []
    for i in range(x.shape[0]):
        state, info = f.step(state, x[i], y[i : i + 1])
        infos.append(info)
    return state, infos


def _report(infos: list[StepInfo]) -> dict[str, Tensor]:
    """Every row's report, stacked over the rows (each field checked to be shaped as a row's)."""
    out: dict[str, list[Tensor]] = {}
    for i in infos:
        assert i.eta is not None and i.var_eta is not None
        fields = {
            "mean": i.predictive.mean,
            "epistemic": i.predictive.epistemic,
            "aleatoric": i.predictive.aleatoric,
            "variance": i.predictive.variance,
            "log_likelihood": i.log_likelihood,
            "eta": i.eta,
            "var_eta": i.var_eta,
        }
        shapes = {k: tuple(v.shape) for k, v in fields.items()}
        assert shapes == {
            **dict.fromkeys(("mean", "epistemic", "aleatoric", "variance", "eta"), (1, 1)),
            "log_likelihood": (),
            "var_eta": (1, 1, 1),
        }
        for k, v in fields.items():
            out.setdefault(k, []).append(v.reshape(-1))
    return {k: torch.cat(v) for k, v in out.items()}


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _warm(f: KalmanFilter, dtype: torch.dtype) -> GaussState:
    """A belief some rows into the stream (so m and P are no longer the prior's)."""
    x, y = _data(5, f.network.input_dim, 99, dtype)
    return _one_at_a_time(f, f.init(dtype), x, y)[0]


@pytest.mark.parametrize("n", [2, 7, BLOCK_ROWS, BLOCK_ROWS + 1, 2 * BLOCK_ROWS + 44])
@pytest.mark.parametrize(
    ("I", "bias", "noise"), [(4, True, 0.3), (4, False, 0.3), (16, True, 1e-3)]
)
def test_the_block_equals_the_rows_one_at_a_time_at_float64(
    n: int, I: int, bias: bool, noise: float
) -> None:
    """(16, 1e-3) is a strong signal: both answers lose more there (eps times about n |x|^2 / r,
    relative to each field's largest value)."""
    f = _filter(I, bias, noise)
    assert applies(f, n)
    state = _warm(f, F64)
    x, y = _data(n, I, n)
    block, infos = f.run(state, x, y)
    rows, expected = _one_at_a_time(f, state, x, y)
    assert len(infos) == n
    assert _rel(block.mean, rows.mean) < 1e-10
    assert _rel(block.cov, rows.cov) < 1e-10
    got, want = _report(infos), _report(expected)
    for k, v in want.items():
        scale = float(v.abs().max())
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-10 * scale, msg=k)


@pytest.mark.parametrize("n", [2, 50, BLOCK_ROWS + 1, 300])
@pytest.mark.parametrize("noise", [0.5, 1e-3])
def test_at_float32_the_block_is_the_float64_answer_rounded(n: int, noise: float) -> None:
    """The float32 rows one at a time lose up to 1e-6 (noise 0.5) or 1e-3 (noise 1e-3, a strong
    signal); the block, in float64 inside, is the float64 answer to float32 rounding."""
    f = _filter(I=16, noise=noise, s0=1.0)
    x, y = _data(n, 16, n + 1, F32)
    state = _warm(f, F32)
    block, infos = f.run(state, x, y)
    rows, expected = _one_at_a_time(f, state, x, y)
    exact, truth = _one_at_a_time(f, _as64(state), x.double(), y.double())
    got, want, true = _report(infos), _report(expected), _report(truth)
    pairs = {"mean": (block.mean, rows.mean, exact.mean), "cov": (block.cov, rows.cov, exact.cov)}
    pairs |= {k: (got[k], want[k], true[k]) for k in want}
    for k, (b, r, t) in pairs.items():
        assert b.dtype == F32, k
        assert _rel(b, t) < 1e-6, k
        assert _rel(b, r) <= _rel(r, t) + 1e-6, k  # the float32 rows, to their own rounding


def _as64(state: GaussState) -> GaussState:
    return GaussState(mean=state.mean.double(), cov=state.cov.double())


@pytest.mark.parametrize("n", [40, 300])
def test_the_block_equals_batch_regression_and_the_joint_gaussian(n: int) -> None:
    I, r, s0 = 3, 0.2, 2.0
    f = _filter(I=I, noise=r, s0=s0)
    x, y = _data(n, I, 3)
    state, infos = f.run(f.init(F64), x, y)

    H = np.hstack([x.numpy(), np.ones((n, 1))])
    Y, mu0 = y.numpy(), f.init(F64).mean.numpy()
    cov = np.linalg.inv(np.eye(I + 1) / s0 + H.T @ H / r)
    mean = cov @ (mu0 / s0 + H.T @ Y / r)
    assert _rel(state.mean, torch.tensor(mean)) < 1e-10
    assert _rel(state.cov, torch.tensor(cov)) < 1e-10

    # Row i's predictive: y_i given y_{<i} under the joint N(H mu0, s0 H H^T + r I).
    S, mu = s0 * H @ H.T + r * np.eye(n), H @ mu0
    pm, pv = np.empty(n), np.empty(n)
    for i in range(min(n, 40)):
        w = np.linalg.solve(S[:i, :i], S[:i, i]) if i else np.zeros(0)
        pm[i] = mu[i] + w @ (Y[:i] - mu[:i])
        pv[i] = S[i, i] - w @ S[:i, i]
    k = min(n, 40)
    got = _report(infos)
    np.testing.assert_allclose(got["mean"][:k].numpy(), pm[:k], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["variance"][:k].numpy(), pv[:k], rtol=1e-10)
    np.testing.assert_allclose(got["var_eta"][:k].numpy(), pv[:k] - r, rtol=1e-9, atol=1e-13)
    z2 = (Y[:k] - pm[:k]) ** 2 / pv[:k]
    logpdf = -0.5 * (z2 + np.log(2 * np.pi * pv[:k]))
    np.testing.assert_allclose(got["log_likelihood"][:k].numpy(), logpdf, rtol=1e-10)
    # All rows: the log densities sum to the joint's (the prediction error decomposition).
    _, logdet = np.linalg.slogdet(S)
    joint = -0.5 * ((Y - mu) @ np.linalg.solve(S, Y - mu) + logdet + n * np.log(2 * np.pi))
    assert abs(float(got["log_likelihood"].sum()) - joint) < 1e-10 * abs(joint)


def test_under_a_strong_signal_the_covariance_keeps_its_digits() -> None:
    """The Joseph form as products, (I - K H) P (I - K H)^T + r K K^T, keeps P_+ to rounding
    where it is small (the expanded P - K H P - (K H P)^T + K S K^T loses 1e-10 here)."""
    n, I, r = 2 * BLOCK_ROWS, 16, 1e-3
    f = _filter(I=I, noise=r, s0=1.0)
    x, y = _data(n, I, 11)
    state, _ = f.run(f.init(F64), x, y)
    H = np.hstack([x.numpy(), np.ones((n, 1))])
    cov = np.linalg.inv(np.eye(I + 1) + H.T @ H / r)  # the precision is well conditioned
    np.testing.assert_allclose(state.cov.diagonal().numpy(), np.diag(cov), rtol=1e-13)
    assert _rel(state.cov, torch.tensor(cov)) < 1e-13


def test_a_request_in_two_is_the_request_whole_and_a_rerun_is_bit_for_bit() -> None:
    f = _filter()
    x, y = _data(90, 4, 5)
    whole, infos = f.run(f.init(F64), x, y)
    first, _ = f.run(f.init(F64), x[:37], y[:37])
    halves, _ = f.run(first, x[37:], y[37:])
    assert _rel(halves.mean, whole.mean) < 1e-10 and _rel(halves.cov, whole.cov) < 1e-10
    again, repeat = f.run(f.init(F64), x, y)  # what a replay of the request computes
    assert torch.equal(again.mean, whole.mean) and torch.equal(again.cov, whole.cov)
    for k, v in _report(infos).items():
        assert torch.equal(_report(repeat)[k], v), k


def test_run_takes_the_block_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    kalman = _filter()
    assert applies(kalman, 2) and not applies(kalman, 1)
    others = [
        OnlineFilter(Linear(4), Gaussian(0.3), EKF()),
        OnlineFilter(Linear(4), Gaussian(0.3), LoFi(2)),
        OnlineFilter(Linear(4, 2), Gaussian(0.3), Kalman()),
        OnlineFilter(Linear(4), Gaussian(0.3), Kalman(), Dynamics(decay=0.99)),
        OnlineFilter(Linear(4), Gaussian(0.3), Kalman(), Dynamics(process_noise=1e-3)),
        OnlineFilter(Linear(4), Gaussian(0.3), Kalman(), Dynamics(0.9, steady_state=True)),
    ]
    assert not any(applies(f, 10) for f in others)
    calls: list[int] = []
    real = online_module.run_block

    def spy(
        f: KalmanFilter, state: GaussState, x: Tensor, Y: Tensor, outputs: Sequence[int] | None
    ) -> object:
        calls.append(x.shape[0])
        return real(f, state, x, Y, outputs)

    monkeypatch.setattr(online_module, "run_block", spy)
    x, y = _data(6, 4, 1)
    kalman.run(kalman.init(F64), x, y)
    kalman.run(kalman.init(F64), x[:1], y[:1])
    for f in others:
        f.run(f.init(F64), x, y.unsqueeze(1).expand(-1, f.network.output_dim))
    assert calls == [6]


def _snapshot(state: GaussState) -> tuple[Tensor, Tensor]:
    return state.mean.clone(), state.cov.clone()


def test_non_finite_x_is_the_requests_error_and_changes_nothing() -> None:
    f = _filter()
    state = _warm(f, F64)
    before = _snapshot(state)
    x, y = _data(4, 4, 2)
    x[2, 1] = float("nan")
    with pytest.raises(InvalidInput, match="NaN"):
        f.run(state, x, y)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(state), before, strict=True))


def _huge_row(dtype: torch.dtype) -> Callable[[GaussState, Tensor], tuple[GaussState, Tensor]]:
    def bad(state: GaussState, x: Tensor) -> tuple[GaussState, Tensor]:
        x = x.clone()
        big = [1e300, -1e300, 1.0, 0.0] if dtype == F64 else [3e30, 0.0, 0.0, 1.0]
        x[1] = torch.tensor(big, dtype=dtype)
        return state, x

    return bad


def _negative_cov(state: GaussState, x: Tensor) -> tuple[GaussState, Tensor]:
    return GaussState(state.mean, -state.cov), x


def _negative_unseen_variance(state: GaussState, x: Tensor) -> tuple[GaussState, Tensor]:
    """P_00 < 0 where no row has x_0 != 0: S is fine, the posterior's diagonal is not."""
    cov = state.cov.clone()
    cov[0, :] = cov[:, 0] = 0.0
    cov[0, 0] = -1.0
    x = x.clone()
    x[:, 0] = 0.0
    return GaussState(state.mean, cov), x


BAD = {
    "huge-float64": (F64, _huge_row(F64), "non_finite"),
    "huge-float32": (F32, _huge_row(F32), "non_finite"),
    "negative-covariance": (F64, _negative_cov, "not_psd"),
    "negative-unseen-variance": (F32, _negative_unseen_variance, "not_psd"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_failed_block_is_rejected_as_the_rows_would_be_and_changes_nothing(case: str) -> None:
    dtype, spoil, reason = BAD[case]
    f = _filter()
    x, y = _data(5, 4, 4, dtype)
    state, x = spoil(_warm(f, dtype), x)
    before = _snapshot(state)
    with pytest.raises(StepRejected) as block:
        f.run(state, x, y)
    with pytest.raises(StepRejected) as rows:
        _one_at_a_time(f, state, x, y)
    assert block.value.reason == reason
    assert _said(block.value) == _said(rows.value)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(state), before, strict=True))


def _said(error: PostserveError) -> tuple[str, str]:
    assert isinstance(error, StepRejected)
    return error.reason, error.message
