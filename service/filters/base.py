"""Containers shared by the likelihoods and filters: the predictive and a step's report."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from service.filters.linalg import Check, check_finite, cholesky, symmetrise

__all__ = ["Innovation", "Linearization", "Predictive", "StepInfo", "innovation"]


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
