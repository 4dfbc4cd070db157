"""Full-covariance filters: the exact linear Kalman filter and the EKF (``docs/algorithms.md`` 3.2, 3.3).

Belief theta ~ N(m, P), P (D, D) dense. One step, with gamma the decay and q the process noise:

    predict:  m' = gamma m,   P' = gamma^2 P + q I
    update:   S = H P H^T + R,   K = P H^T S^{-1},   m_+ = m + K (y - yhat)
              EKF     (rebayes ``_full_covariance_condition_on``):  P_+ = P - K H P  (= P - K S K^T)
              Kalman  (Joseph form):  P_+ = (I - K H) P (I - K H)^T + K R K^T

The Kalman filter is exact for a linear network with a Gaussian likelihood, where H is the design
matrix; the EKF linearises h at the predicted mean. Both are O(D^2 C) per step and O(D^2) memory, so
practical up to D of about 1e4. The Joseph form is evaluated expanded,
P - K H P - (K H P)^T + K S K^T, which keeps it O(D^2 C) instead of O(D^3).

References: Chang, Duran-Martin, Shestopaloff, Jones, Murphy (2023), "Low-rank extended Kalman
filtering for online learning of neural networks from streaming data", arXiv 2305.19535.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from service.errors import InvalidSpec
from service.filters.base import Linearization, innovation
from service.filters.likelihoods import Gaussian, Likelihood
from service.filters.linalg import Check, cholesky, finite_check, positive_check, symmetrise
from service.filters.networks import Jacobian, Network

__all__ = ["EKF", "GaussState", "Kalman"]

#: ``project`` forms J in blocks of rows of at most about 2**24 numbers.
_DENSE_NUMBERS = 1 << 24


@dataclass(frozen=True)
class GaussState:
    """N(mean, cov): ``mean`` m (D,), ``cov`` P (D, D)."""

    mean: Tensor
    cov: Tensor


@dataclass(frozen=True)
class EKF:
    """The full-covariance extended Kalman filter ("fcekf" in rebayes)."""

    name: str = "ekf"
    joseph: bool = False

    def check_model(self, network: Network, likelihood: Likelihood) -> None:
        """Every network and likelihood (the EKF linearises whatever it is given)."""

    def init(self, mean: Tensor, variance: float | Tensor) -> GaussState:
        if isinstance(variance, Tensor):  # one prior variance per parameter (D,)
            return GaussState(mean=mean, cov=torch.diag(variance.to(mean)))
        eye = torch.eye(mean.shape[0], dtype=mean.dtype, device=mean.device)
        return GaussState(mean=mean, cov=variance * eye)

    def predict(self, state: GaussState, decay: float, process_noise: float) -> GaussState:
        if decay == 1.0 and process_noise == 0.0:
            return state
        P = decay**2 * state.cov
        if process_noise:
            P = P + process_noise * torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
        return GaussState(mean=decay * state.mean, cov=P)

    def project(self, state: GaussState, J: Jacobian) -> Tensor:
        """J P J^T (N, C, C) through the dense J, formed in blocks of rows (``docs/algorithms.md``
        4.1): P is dense, so the O(N C D^2) product dominates whatever form J comes in."""
        N, C, D = J.shape
        step = max(1, _DENSE_NUMBERS // (C * D))
        parts = []
        for start in range(0, N, step):
            Jd = J.dense(start, start + step)
            parts.append(symmetrise(Jd @ state.cov @ Jd.mT))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def condition_on(
        self, state: GaussState, lin: Linearization, y: Tensor
    ) -> tuple[GaussState, Tensor, tuple[Check, ...]]:
        P = state.cov
        PJt = P @ lin.J.mT
        JPJ = symmetrise(lin.J @ PJt)
        inn = innovation(JPJ, lin, y)
        PHt = PJt if lin.V is None else PJt @ lin.V.mT
        K = inn.solve(PHt.mT).mT  # P H^T S^{-1}
        KHP = K @ PHt.mT
        cov = P - KHP - KHP.mT + K @ inn.S @ K.mT if self.joseph else P - KHP
        new = GaussState(mean=state.mean + PJt @ inn.w, cov=symmetrise(cov))
        return new, JPJ, inn.checks

    def validity(self, state: GaussState) -> tuple[Check, ...]:
        """Finite everywhere and a positive diagonal (a full PSD check would cost O(D^3))."""
        return (
            finite_check("the mean and covariance", state.mean, state.cov),
            positive_check("the covariance diagonal", state.cov.diagonal()),
        )

    def sample(self, state: GaussState, n: int, generator: torch.Generator | None) -> Tensor:
        L = cholesky(state.cov, what="the covariance")
        eps = torch.randn(
            (n, state.mean.shape[0]), generator=generator, dtype=L.dtype, device=L.device
        )
        return state.mean + eps @ L.mT

    def covariance(self, state: GaussState) -> Tensor:
        return state.cov

    def state_bytes(self, state: GaussState) -> int:
        return sum(t.numel() * t.element_size() for t in (state.mean, state.cov))


@dataclass(frozen=True)
class Kalman(EKF):
    """The exact linear Kalman filter: EKF algebra with the Joseph-form covariance update.

    Only for a linear network with a Gaussian likelihood (checked when the filter is built), where
    the linearisation is exact and the posterior after T steps with q = 0 equals the batch Bayesian
    linear-regression posterior.
    """

    name: str = "kalman"
    joseph: bool = True

    def check_model(self, network: Network, likelihood: Likelihood) -> None:
        if not (network.linear_in_params and isinstance(likelihood, Gaussian)):
            raise InvalidSpec(
                "the kalman filter is exact only for a linear network with a gaussian "
                "likelihood; use ekf, diagonal or lofi"
            )
