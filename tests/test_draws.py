"""Linearised Thompson draws (``service.filters.draws``) against their law, computed here.

Independent truth: the linearised predictive of rows x is N(g(m, x), J P J^T) with J from
autodiff (``torch.func``) and P the belief's dense covariance; draws of it, in output space
(N C <= D) or through theta (N C > D), must have that mean and covariance (Monte Carlo, fixed
seeds, tolerances of about 5 standard errors), and a network linear in its parameters draws the
same way whichever is asked.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from service.components import ALGORITHMS
from service.components.build import build_filter
from service.filters import OnlineFilter, jacobian_autodiff
from service.filters.draws import argmax_shares
from service.filters.linalg import psd_sqrt
from service.schemas import ModelSpec

F64 = torch.float64
N_DRAWS = 20000


def _mlp_filter(algorithm: str) -> OnlineFilter[Any]:
    spec = ModelSpec.model_validate(
        {
            "name": "draws",
            "network": {"type": "mlp", "input_dim": 3, "hidden": [4], "output_dim": 2},
            "likelihood": {"type": "gaussian", "noise_variance": 0.3},
            "filter": {"type": algorithm, **ALGORITHMS[algorithm].example},
            "prior": {"variance": 0.5},
            "dtype": "float64",
        }
    )
    return build_filter(spec)


def _law(f: OnlineFilter[Any], state: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    g = f.network.apply(state.mean, x).reshape(-1)
    J = jacobian_autodiff(f.network, state.mean, x).reshape(g.shape[0], -1)
    return g, J @ f.algorithm.covariance(state) @ J.T


@pytest.mark.parametrize("rows", [2, 15])  # N C = 4 <= D = 26; 30 > 26: through theta
@pytest.mark.parametrize("algorithm", ["lofi", "ekf"])
def test_linearised_draws_have_the_linearised_predictive_law(algorithm: str, rows: int) -> None:
    f = _mlp_filter(algorithm)
    gen = torch.Generator().manual_seed(0)
    state = f.init(dtype=F64)
    X = torch.randn(6, 3, dtype=F64, generator=gen)
    state, _ = f.run(state, X, torch.randn(6, 2, dtype=F64, generator=gen))
    x = torch.randn(rows, 3, dtype=F64, generator=gen)
    draws = f.sample_outputs(state, x, N_DRAWS, gen, linearized=True).reshape(N_DRAWS, -1)
    mean, cov = _law(f, state, x)
    sd = cov.diagonal().sqrt()
    assert ((draws.mean(0) - mean).abs() <= 5 * sd / N_DRAWS**0.5).all()
    emp = torch.cov(draws.T)
    tol = 5 * (sd[:, None] * sd[None, :]) * (2 / N_DRAWS) ** 0.5
    assert ((emp - cov).abs() <= tol).all()


def test_each_group_draws_its_own_linearised_law() -> None:
    f = _mlp_filter("lofi")
    gen = torch.Generator().manual_seed(1)
    state = f.init(dtype=F64)
    x = torch.randn(3, 1, 3, dtype=F64, generator=gen)  # 3 groups of one row
    draws = f.sample_outputs_each(state, x, N_DRAWS, gen, linearized=True)
    assert draws.shape == (3, N_DRAWS, 1, 2)
    for g in range(3):
        mean, cov = _law(f, state, x[g])
        emp = draws[g, :, 0]
        sd = cov.diagonal().sqrt()
        assert ((emp.mean(0) - mean).abs() <= 5 * sd / N_DRAWS**0.5).all()
        tol = 5 * (sd[:, None] * sd[None, :]) * (2 / N_DRAWS) ** 0.5
        assert ((torch.cov(emp.T) - cov).abs() <= tol).all()
    # groups are independent: the first output's draws of two groups are uncorrelated
    r = torch.corrcoef(torch.stack([draws[0, :, 0, 0], draws[1, :, 0, 0]]))[0, 1]
    assert abs(float(r)) < 5 / N_DRAWS**0.5


def test_a_linear_network_draws_alike_either_way() -> None:
    spec = ModelSpec.model_validate(
        {
            "name": "lin",
            "network": {"type": "linear", "input_dim": 3, "output_dim": 2},
            "likelihood": {"type": "gaussian"},
            "filter": {"type": "kalman"},
            "dtype": "float64",
        }
    )
    f = build_filter(spec)
    state = f.init(dtype=F64)
    x = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    a = f.sample_outputs(state, x, 50, torch.Generator().manual_seed(3))
    b = f.sample_outputs(state, x, 50, torch.Generator().manual_seed(3), linearized=True)
    assert torch.equal(a, b)


def test_the_root_of_a_covariance_is_symmetric_and_moves_with_it() -> None:
    """``psd_sqrt`` is the symmetric root, against scipy's ``sqrtm``: unique, so a covariance
    perturbed at rounding level (here with a repeated eigenvalue, whose eigenvectors ``eigh`` may
    return in any basis) has a root perturbed at rounding level, and so do seeded draws of it."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=F64, generator=g))
    A = Q @ torch.diag(torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0], dtype=F64)) @ Q.T  # singular
    B = A + 1e-13 * torch.randn(5, 5, dtype=F64, generator=g)
    B = (B + B.T) / 2
    for M in (A, B):
        F = psd_sqrt(M)
        assert torch.allclose(F, F.T, atol=1e-14)
        torch.testing.assert_close(F @ F, M, rtol=0, atol=1e-12)
        expected = torch.from_numpy(scipy_linalg.sqrtm(M.numpy()).real)
        torch.testing.assert_close(F, expected, rtol=0, atol=1e-6)  # sqrtm: about sqrt(eps)
    assert (psd_sqrt(A) - psd_sqrt(B)).abs().max() < 1e-6


@pytest.mark.parametrize("arms", [7, 300])  # a uint8 weight, and a long one past 255
def test_argmax_shares_take_the_first_maximum_at_any_stride(arms: int) -> None:
    """``argmax_shares`` against ``torch.argmax`` (lowest index on ties) and counts done here,
    on a contiguous stack and on a view whose draws axis is innermost (how ``_each`` lays its
    draws out), with ties planted by rounding draws to a coarse grid."""
    g = torch.Generator().manual_seed(6)
    G, M = 5, 64
    draws = torch.round(torch.randn(G, arms, M, dtype=F64, generator=g) * 2) / 2  # many ties
    view = draws.permute(0, 2, 1)  # (G, M, A), M innermost
    for d in (view, view.contiguous()):
        winners, shares = argmax_shares(d)
        assert torch.equal(winners, d.contiguous().argmax(dim=2))
        for k in range(G):
            counts = torch.bincount(winners[k], minlength=arms).to(F64)
            assert torch.equal(shares[k], counts / M)
    assert (view == view.amax(dim=2, keepdim=True)).sum(dim=2).max() > 1  # ties were planted
