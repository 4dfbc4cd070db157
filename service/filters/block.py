"""Many rows of the exact Kalman filter in one update (``docs/algorithms.md`` 3.7).

With static dynamics (gamma = 1, q = 0) nothing happens between two rows but their updates, and
for a linear network with a gaussian likelihood and one output, n sequential Kalman updates equal
one update on the n rows at once. Every row's pre-update (one-step-ahead) predictive is read off
the Cholesky factor of the rows' joint innovation covariance. One row of the block:

==========  =========  ================================================================
symbol      shape      meaning
==========  =========  ================================================================
m, P        (D,) (D,D) the belief before the block (``GaussState``)
H           (n, D)     the rows' Jacobians, J[:, 0] (for ``Linear``: [x, 1])
g           (n,)       g(m, x): each row's network output at m
y           (n,)       the targets
r           ()         the noise variance (R = r I_n)
S, L        (n, n)     S = H P H^T + r I = L L^T, L lower triangular
z           (n,)       L^{-1} (y - g)
B           (n, D)     L^{-1} H P
K           (D, n)     P H^T S^{-1}  (held as K^T = L^{-T} B)
==========  =========  ================================================================

The equations (``block_update``)::

    m_+   = m + B^T z                                          (= m + K (y - g))
    P_+   = sym( (I - K H) P (I - K H)^T + r K K^T )           the Joseph form, as products:
            A = P - K (H P),  P_+ = sym( A - (A H^T) K^T + r K K^T )
    s_i   = L_ii^2                                             row i's predictive variance
    eta_i = g_i + sum_{j<i} L_ij z_j                           its pre-update mean g(m_{i-1}, x_i)
    Omega_i = s_i - r                                          its epistemic part, J Sigma J^T

Row i's predictive given rows 1..i-1 is the conditional law of y_i given y_{<i} under
N(g, S): variance S_ii - S_{i,<i} S_{<i}^{-1} S_{<i,i} = L_ii^2, mean g_i + S_{i,<i}
S_{<i}^{-1} (y - g)_{<i} = g_i + L_{i,<i} z_{<i}. Its log density is the likelihood's own
(``log_predictive``), the sum over rows being log N(y; g, S).

The kernel computes in float64 on every device that has it (all but mps), whatever the state's
dtype, and rounds its outputs to the state's dtype. S has a condition number up to
1 + n |H P H^T| / r, and in float32 the block would lose about n times what one row of the
row-by-row filter does; computed in float64, its float32 answers are closer to the exact ones
than the float32 row-by-row filter's. For a small model that costs nothing (the time is per-op
overhead); for a large float32 one its D x D work takes twice the memory and, on a GPU slow at
float64, more time. The expanded Joseph form P - K H P - (K H P)^T + K S K^T, which the
row-by-row filter uses, would lose digits here even in float64 (1e-10 relative under a strong
signal, where P_+ is small) that the products keep.

The rows go in blocks of at most ``BLOCK_ROWS``, each from the belief the one before left, so that
S stays small (its factorisation costs n^3 / 3). Checks, deferred and settled by the caller with
the request's (``docs/algorithms.md`` 6.4): S finite; its plain Cholesky factorisation succeeded
(``not_psd`` otherwise: with one output the row-by-row filter does not jitter its 1 x 1 S either);
the posterior's validity; each row's predictive finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from service.filters.base import Predictive, StepInfo
from service.filters.ekf import Kalman
from service.filters.likelihoods import Gaussian
from service.filters.linalg import Check, finite_check, identity, symmetrise
from service.filters.statespace import StateSpace

if TYPE_CHECKING:
    from service.filters.algorithm import S
    from service.filters.online import OnlineFilter

__all__ = ["BLOCK_ROWS", "Block", "applies", "block_update", "run_block"]

#: Rows per block: S is at most BLOCK_ROWS x BLOCK_ROWS.
BLOCK_ROWS = 128


@dataclass(frozen=True)
class Block:
    """What one block update gives, in the state's dtype: the posterior ``mean`` m_+ (D,) and
    ``cov`` P_+ (D, D); each row's pre-update network output ``eta`` (n,) and its variance
    ``var_eta`` Omega (n,); and the ``checks`` of S (finite, factorised)."""

    mean: Tensor
    cov: Tensor
    eta: Tensor
    var_eta: Tensor
    checks: tuple[Check, Check]


def applies(f: OnlineFilter[S], rows: int, partial: bool = False) -> bool:
    """Whether ``f.run`` on ``rows`` rows goes through the block update: the exact Kalman filter
    (a linear network, a gaussian likelihood) with static dynamics, rows >= 2, and one output
    or rows that each observe one output (``partial``, ``docs/algorithms.md`` 3.8)."""
    return (
        rows >= 2
        and isinstance(f.algorithm, Kalman)
        and isinstance(f.likelihood, Gaussian)
        and (f.network.output_dim == 1 or partial)
        and f.network.linear_in_params
        and f.dynamics.decay == 1.0
        and f.process_noise == 0.0
        and not isinstance(f.network, StateSpace)  # its transition moves the state between rows
    )


def _working(t: Tensor) -> torch.dtype:
    """float64 wherever the device has it (mps does not)."""
    return t.dtype if t.device.type == "mps" else torch.float64


def block_update(m: Tensor, P: Tensor, H: Tensor, g: Tensor, y: Tensor, r: float | Tensor) -> Block:
    """One block: m (D,), P (D, D), H (n, D), g (n,), y (n,), r > 0; the module's equations,
    with R = r I, or R = diag(r) for r (n,) (rows of different outputs: 3.8).

    Two rows y = 1 on theta_0 ~ N(0, 1) with r = 1: the second row is predicted from the first's
    posterior N(1/2, 1/2), and the block's posterior is N(2/3, 1/3).

    >>> f64 = torch.float64
    >>> m, P = torch.zeros(2, dtype=f64), torch.eye(2, dtype=f64)
    >>> H = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=f64)
    >>> out = block_update(m, P, H, H @ m, torch.ones(2, dtype=f64), 1.0)
    >>> [round(v, 6) for v in (*out.eta.tolist(), *out.var_eta.tolist())]  # eta, then Omega
    [0.0, 0.5, 1.0, 0.5]
    >>> round(float(out.mean[0]), 6), round(float(out.cov[0, 0]), 6), float(out.cov[1, 1])
    (0.666667, 0.333333, 1.0)
    """
    dtype, work = m.dtype, _working(m)
    m, P, H, g, y = (t.to(work) for t in (m, P, H, g, y))
    n = H.shape[0]
    r = r.to(work) if isinstance(r, Tensor) else r
    PHt = P @ H.mT  # (D, n)
    R = torch.diag(r) if isinstance(r, Tensor) else r * identity(n, work, H.device)
    S = symmetrise(H @ PHt) + R
    L, info = torch.linalg.cholesky_ex(S)
    Z = torch.linalg.solve_triangular(L, torch.cat([(y - g).unsqueeze(1), PHt.mT], 1), upper=False)
    z, B = Z[:, 0], Z[:, 1:]
    Kt = torch.linalg.solve_triangular(L.mT, B, upper=True)  # K^T = S^{-1} H P (n, D)
    A = P - Kt.mT @ PHt.mT  # (I - K H) P
    rK = r.unsqueeze(1) * Kt if isinstance(r, Tensor) else r * Kt  # R K^T
    cov = symmetrise(A - (A @ H.mT) @ Kt + Kt.mT @ rK)
    eta = g + torch.tril(L, -1) @ z
    var_eta = L.diagonal() ** 2 - r
    factored = (info == 0).to(dtype).log()  # 0 when factorised, -inf otherwise
    return Block(
        mean=(m + B.mT @ z).to(dtype),
        cov=cov.to(dtype),
        eta=eta.to(dtype),
        var_eta=var_eta.to(dtype),
        checks=(
            finite_check("the innovation covariance", S.sum().to(dtype)),
            Check("not_psd", "the innovation covariance S is not positive definite", factored),
        ),
    )


def run_block(
    f: OnlineFilter[S], state: S, x: Tensor, Y: Tensor, outputs: Sequence[int] | None = None
) -> tuple[S, list[StepInfo], list[Check]]:
    """``f.run`` through block updates, for validated rows x (N, I) and encoded targets Y (N, 1)
    of the state's dtype, where :func:`applies`: the new state, one StepInfo per row (as the
    row-by-row filter reports it), and the checks, for the caller to settle. With ``outputs``,
    row i observes output ``outputs[i]`` alone (H its row of J, r its noise variance)."""
    lik = f.likelihood
    if not (applies(f, x.shape[0], outputs is not None) and isinstance(lik, Gaussian)):
        raise ValueError("run_block serves the exact Kalman filter with static dynamics only")
    nv = lik.noise_variance
    noise = [float(v) for v in nv] if isinstance(nv, tuple) else [float(nv)]
    ks = None if outputs is None else torch.tensor(outputs, device=x.device)
    infos: list[StepInfo] = []
    checks: list[Check] = []
    for start in range(0, x.shape[0], BLOCK_ROWS):
        g, J = f.network.jacobian(state.mean, x[start : start + BLOCK_ROWS])
        y = Y[start : start + BLOCK_ROWS]
        r: float | Tensor = noise[0]  # one noise variance, or each row's output's (n,)
        if ks is None:
            k, H, gk = None, J[:, 0], g[:, 0]
        else:
            k = ks[start : start + BLOCK_ROWS]
            rows = torch.arange(g.shape[0], device=g.device)
            H, gk = J[rows, k], g[rows, k]
            if len(noise) > 1:
                r = torch.tensor(noise, dtype=torch.float64, device=g.device)[k]
        out = block_update(state.mean, f.algorithm.covariance(state), H, gk, y[:, 0], r)
        state = replace(state, mean=out.mean, cov=out.cov)
        eta, var_eta = out.eta.unsqueeze(1), out.var_eta.reshape(-1, 1, 1)
        # each row's output's own likelihood, where the outputs' noise variances differ
        pred, loglik = _reports(lik, eta, var_eta, y, k if len(noise) > 1 else None)
        checks += [
            *out.checks,
            *f.algorithm.validity(state),
            finite_check("the pre-update prediction", pred.mean, pred.variance, loglik),
        ]
        infos += _infos(pred, loglik, eta, var_eta)
    return state, infos, checks


def _reports(
    lik: Gaussian, eta: Tensor, var_eta: Tensor, y: Tensor, k: Tensor | None
) -> tuple[Predictive, Tensor]:
    """The rows' predictive and log densities, each row's of its own output: the likelihood's,
    or with ``k`` (n,) that of each output's restriction, for its rows."""
    if k is None:
        return lik.predictive(eta, var_eta), lik.log_predictive(y, eta, var_eta)
    mean, ep, al, ll = eta.clone(), eta.clone(), eta.clone(), y.new_empty(y.shape[0])
    for output in sorted(set(k.tolist())):
        rows = (k == output).nonzero().squeeze(1)
        part = lik.restrict(output)
        p = part.predictive(eta[rows], var_eta[rows])
        mean[rows], ep[rows], al[rows] = p.mean, p.epistemic, p.aleatoric
        ll[rows] = part.log_predictive(y[rows], eta[rows], var_eta[rows])
    return Predictive(mean, ep, al), ll


def _infos(pred: Predictive, loglik: Tensor, eta: Tensor, var_eta: Tensor) -> list[StepInfo]:
    """One StepInfo per row, each field a view of the block's, shaped as a row's: (1, C).

    A view costs more than the row's arithmetic did, so the gaussian's mean (eta itself) and its
    aleatoric part (one number, stride 0 over the rows) take no views of their own."""
    etas = eta.unsqueeze(1).unbind()
    means = etas if pred.mean is eta else pred.mean.unsqueeze(1).unbind()
    al = pred.aleatoric
    alea = [al[:1]] * len(etas) if al.stride(0) == 0 else al.unsqueeze(1).unbind()
    # each row's packed report (``base.packed``), one row of one (n, 4 C + 1) tensor
    fields = [pred.mean, pred.variance, pred.epistemic, pred.aleatoric, loglik.unsqueeze(1)]
    reports = torch.cat([t.expand(eta.shape[0], -1) for t in fields], 1).unbind()
    rows = zip(
        means,
        pred.epistemic.unsqueeze(1).unbind(),
        alea,
        loglik.unbind(),
        etas,
        var_eta.unsqueeze(1).unbind(),
        reports,
        strict=True,
    )
    return [StepInfo(Predictive(mu, ep, a), ll, e, v, p) for mu, ep, a, ll, e, v, p in rows]
