"""Containers shared by the likelihoods and filters: the predictive and a step's report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from service.filters.linalg import Check, check_finite, cholesky, symmetrise

__all__ = [
    "Innovation",
    "Linearization",
    "Predictive",
    "RowReport",
    "StepInfo",
    "innovation",
    "packed",
    "row_reports",
]


@dataclass(frozen=True)
class Predictive:
    """Predictive moments of y for N rows with C outputs, each field (N, C).

    ``mean`` is E[y] (for bernoulli and categorical: the predictive probability). ``epistemic`` is
    Var[E[y | theta]] (the part the posterior can still shrink), ``aleatoric`` is E[Var[y | theta]]
    (the noise), and by the law of total variance ``variance = epistemic + aleatoric``.
    """

    mean: Tensor
    epistemic: Tensor
    aleatoric: Tensor

    @property
    def variance(self) -> Tensor:
        return self.epistemic + self.aleatoric


@dataclass(frozen=True)
class Linearization:
    """The moment-matched Gaussian observation model at the predicted mean m (one row).

    y ~ N(yhat + H (theta - m), R) with H = V J: ``J`` = dg/dtheta (C, D) is the network's Jacobian
    and ``V`` (C, C) is dmu/deta (``None`` for the identity link, i.e. H = J).
    """

    yhat: Tensor
    J: Tensor
    V: Tensor | None
    R: Tensor

    @property
    def H(self) -> Tensor:
        return self.J if self.V is None else self.V @ self.J


@dataclass(frozen=True)
class StepInfo:
    """What one update reports about its observation, computed before conditioning on it.

    ``predictive`` is the pre-update predictive of the row (fields of shape (1, C)), and
    ``log_likelihood`` the log predictive density of y under it (a 0-d tensor): the one-step-ahead
    figures that calibration and NLPD are measured on. ``eta`` (1, C) and ``var_eta`` (1, C, C)
    are the network output and its linearised variance J Sigma J^T behind that predictive (what
    ``Likelihood.pit`` takes).
    """

    predictive: Predictive
    log_likelihood: Tensor
    eta: Tensor | None = None
    var_eta: Tensor | None = None
    packed: Tensor | None = None  # :func:`packed` of this report, where its step made it


@dataclass(frozen=True)
class RowReport:
    """A :class:`StepInfo`'s numbers on the host, as Python floats (what answers and
    calibration read): the pre-update predictive's mean and variances (C each; ``variance`` is
    epistemic + aleatoric in the model's dtype) and the log predictive density."""

    mean: list[float]
    variance: list[float]
    epistemic: list[float]
    aleatoric: list[float]
    log_likelihood: float


def packed(info: StepInfo) -> Tensor:
    """A row's report as one vector (4 C + 1,): the predictive's mean, variance, epistemic and
    aleatoric variances, then the log density (what :func:`row_reports` copies to the host; a
    compiled step returns it ready, at no cost)."""
    p = info.predictive
    parts = [p.mean, p.variance, p.epistemic, p.aleatoric, info.log_likelihood]
    return torch.cat([t.reshape(-1) for t in parts])


def row_reports(infos: Sequence[StepInfo]) -> list[RowReport]:
    """The rows' reports, copied to the host in one go (one ``tolist``: per-row, per-field
    copies cost more than a small model's step)."""
    if not infos:
        return []
    C = infos[0].predictive.mean.shape[-1]
    vectors = [packed(i) if i.packed is None else i.packed for i in infos]
    flat: list[float] = (vectors[0] if len(vectors) == 1 else torch.cat(vectors)).tolist()
    n = 4 * C + 1
    return [
        RowReport(
            flat[k : k + C],
            flat[k + C : k + 2 * C],
            flat[k + 2 * C : k + 3 * C],
            flat[k + 3 * C : k + 4 * C],
            flat[k + 4 * C],
        )
        for k in range(0, n * len(infos), n)
    ]


@dataclass(frozen=True)
class Innovation:
    """The conditioning quantities every filter shares for one row.

    ``S`` = H Sigma H^T + R (C, C) with its Cholesky factor ``L``, and ``w`` = V^T S^{-1} (y - yhat)
    (C,), so that the exact EKF posterior mean under the prior belief Sigma is

        m_+ = m + K (y - yhat) = m + Sigma J^T w,     K = Sigma J^T V^T S^{-1}.
    """

    S: Tensor
    L: Tensor
    w: Tensor
    checks: tuple[Check, ...] = ()

    def solve(self, B: Tensor) -> Tensor:
        """S^{-1} B for B (C, k)."""
        if self.S.shape[-1] == 1:
            return B / self.S
        return torch.cholesky_solve(B, self.L)


def innovation(JSJ: Tensor, lin: Linearization, y: Tensor) -> Innovation:
    """S = V (J Sigma J^T) V^T + R and the weights w of the mean step, from J Sigma J^T (C, C).

    Each filter supplies its own J Sigma J^T (dense, diagonal, or by Woodbury for LoFi) and applies
    Sigma J^T to w its own way; everything in between is shared. With one output S is a number:
    no factorisation, and its positivity is a deferred check (``checks``) that the caller settles
    with the rest of the step's; with several, S is factored here (and a failure raises now).
    """
    S = JSJ if lin.V is None else lin.V @ JSJ @ lin.V.mT
    S = symmetrise(S + lin.R)
    if S.shape[-1] == 1:
        a = (y - lin.yhat) / S[0]
        s = S[0, 0]
        finite = Check("non_finite", "the step made the innovation covariance non-finite", s)
        positive = Check("not_psd", "the innovation covariance S is not positive definite", s.log())
        w = a if lin.V is None else lin.V.mT @ a
        return Innovation(S=S, L=S.sqrt(), w=w, checks=(finite, positive))
    check_finite("the innovation covariance", S)
    L = cholesky(S, what="the innovation covariance S")
    a = torch.cholesky_solve((y - lin.yhat).unsqueeze(-1), L).squeeze(-1)
    return Innovation(S=S, L=L, w=a if lin.V is None else lin.V.mT @ a)
