"""Containers shared by the likelihoods and filters: the predictive and a step's report."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from service.filters.linalg import check_finite, gain

__all__ = ["Linearization", "Predictive", "StepInfo", "condition_mean"]


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
    figures that calibration and NLPD are measured on.
    """

    predictive: Predictive
    log_likelihood: Tensor


@dataclass(frozen=True)
class Innovation:
    """The conditioning quantities every filter shares for one row.

    ``SHt`` = Sigma H^T (D, C), ``S`` = H Sigma H^T + R (C, C), ``K`` = Sigma H^T S^{-1} (D, C), and
    ``mean`` = m + K (y - yhat), the exact EKF posterior mean under the prior belief Sigma.
    """

    SHt: Tensor
    S: Tensor
    K: Tensor
    mean: Tensor


def condition_mean(
    m: Tensor, SJt: Tensor, JSJ: Tensor, lin: Linearization, y: Tensor
) -> Innovation:
    """EKF mean step from Sigma J^T (D, C) and J Sigma J^T (C, C), with H = V J.

    Each filter supplies its own Sigma J^T and J Sigma J^T (dense, diagonal, or by Woodbury for LoFi);
    everything after that is the same covariance-form update: S = V (J Sigma J^T) V^T + R,
    K = Sigma J^T V^T S^{-1}, m_+ = m + K (y - yhat).
    """
    if lin.V is None:
        SHt, HSH = SJt, JSJ
    else:
        SHt, HSH = SJt @ lin.V.mT, lin.V @ JSJ @ lin.V.mT
    S = HSH + lin.R
    check_finite("the innovation covariance", S)
    K, _ = gain(SHt, S)
    return Innovation(SHt=SHt, S=S, K=K, mean=m + K @ (y - lin.yhat))
