"""The variational diagonal EKF, VDEKF (``docs/algorithms.md`` 3.4; rebayes "vdekf").

Belief theta ~ N(m, diag(p)), p (D,) the marginal variances. One step:

    predict:  m' = gamma m,   p' = gamma^2 p + q
    update:   S = H diag(p) H^T + R,   K = diag(p) H^T S^{-1},   m_+ = m + K (y - yhat)
              1/p_+ = 1/p + diag(H^T R^{-1} H)          (keep the diagonal of the EKF precision)

This is the exclusive-KL optimum among diagonal Gaussians, and equals LoFi with rank 0.
O(D C^2) time and O(D) memory per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from service.filters.base import Linearization, innovation
from service.filters.likelihoods import Likelihood
from service.filters.linalg import Check, cholesky, finite_check, positive_check
from service.filters.networks import Jacobian, Network

__all__ = ["DiagState", "Diagonal"]


@dataclass(frozen=True)
class DiagState:
    """N(mean, diag(var)): ``mean`` m (D,), ``var`` p (D,)."""

    mean: Tensor
    var: Tensor


@dataclass(frozen=True)
class Diagonal:
    """The variational diagonal EKF."""

    name: str = "diagonal"

    def check_model(self, network: Network, likelihood: Likelihood) -> None:
        """Every network and likelihood."""

    def init(self, mean: Tensor, variance: float | Tensor) -> DiagState:
        if isinstance(variance, Tensor):  # one prior variance per parameter (D,)
            return DiagState(mean=mean, var=variance.to(mean))
        return DiagState(mean=mean, var=torch.full_like(mean, variance))

    def predict(self, state: DiagState, decay: float, process_noise: float) -> DiagState:
        if decay == 1.0 and process_noise == 0.0:
            return state
        return DiagState(mean=decay * state.mean, var=decay**2 * state.var + process_noise)

    def project(self, state: DiagState, J: Jacobian) -> Tensor:
        """J diag(p) J^T (N, C, C): ``J.gram(p)`` (``docs/algorithms.md`` 4.1)."""
        return J.gram(state.var)

    def condition_on(
        self, state: DiagState, lin: Linearization, y: Tensor
    ) -> tuple[DiagState, Tensor, tuple[Check, ...]]:
        pJ = lin.J * state.var
        JPJ = pJ @ lin.J.mT
        inn = innovation(JPJ, lin, y)
        LR = cholesky(lin.R, what="the observation covariance R")
        AH = torch.linalg.solve_triangular(LR, lin.H, upper=False)  # A^T H with A A^T = R^{-1}
        precision = 1 / state.var + (AH * AH).sum(0)
        return DiagState(mean=state.mean + inn.w @ pJ, var=1 / precision), JPJ, inn.checks

    def validity(self, state: DiagState) -> tuple[Check, ...]:
        return finite_check("the mean", state.mean), positive_check("the variances", state.var)

    def sample(self, state: DiagState, n: int, generator: torch.Generator | None) -> Tensor:
        eps = torch.randn(
            (n, state.mean.shape[0]),
            generator=generator,
            dtype=state.var.dtype,
            device=state.var.device,
        )
        return state.mean + eps * state.var.sqrt()

    def covariance(self, state: DiagState) -> Tensor:
        return torch.diag(state.var)

    def state_bytes(self, state: DiagState) -> int:
        return sum(t.numel() * t.element_size() for t in (state.mean, state.var))
