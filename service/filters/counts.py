"""The Poisson likelihood: counts with a log link (``docs/algorithms.md`` 2.1-2.5).

y in {0, 1, 2, ...} with rate exp(eta). Moment-matched: mu = V = exp(eta), R = max(mu, 1e-6) (the
floor keeps the innovation positive definite). Predictive: eta ~ N(g, v) makes the rate
log-normal, E[rate] = exp(g + v/2), Var[rate] = (exp(v) - 1) exp(2g + v); its log mass and CDF by
Gauss-Hermite quadrature (``service.filters.quadrature``). Counts span orders of magnitude, so the
default prior of the output bias (the log-rate's level) is ``prior_bias_scale`` = 16 times the
prior variance of the other parameters (a standard deviation 4 times wider: the intercept prior
of Gelman, Jakulin, Pittau & Su 2008 against their coefficients'; ``docs/algorithms.md`` 1.4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from service.errors import InvalidInput
from service.filters.base import Linearization, Predictive
from service.filters.likelihoods import (
    ITERATIONS,
    _as_rows,
    _check_iterations,
    _require_single_output,
)
from service.filters.quadrature import poisson_lognormal_cdf, poisson_lognormal_logpmf

__all__ = ["Poisson"]


@dataclass(frozen=True)
class Poisson:
    """y in {0, 1, 2, ...}, rate exp(eta); ``iterations`` as for Bernoulli."""

    iterations: int = field(default=ITERATIONS, kw_only=True)
    name: str = field(default="poisson", init=False)
    #: The output bias's default prior variance over the other parameters' (module docstring).
    prior_bias_scale: ClassVar[float] = 16.0

    def __post_init__(self) -> None:
        _check_iterations(self.name, self.iterations)

    def check_output_dim(self, output_dim: int) -> None:
        _require_single_output(self.name, output_dim)

    def restrict(self, k: int) -> Poisson:
        return self  # one output: observing it is observing all

    def encode(self, y: Tensor, output_dim: int) -> Tensor:
        y = _as_rows(y, 1, "poisson")
        if not bool(((y >= 0) & (y == torch.round(y))).all()):
            raise InvalidInput("poisson: every y must be a non-negative integer count")
        return y

    def mean(self, eta: Tensor) -> Tensor:
        return torch.exp(eta)

    def hessian(self, eta: Tensor) -> Tensor:
        return torch.diag_embed(torch.exp(eta))

    @property
    def mean_needs_variance(self) -> bool:
        return True

    def variance_diag(self, eta: Tensor) -> Tensor:
        return torch.exp(eta)

    def log_prob(self, y: Tensor, eta: Tensor) -> Tensor:
        return (y * eta - torch.exp(eta) - torch.lgamma(y + 1)).sum(-1)

    def linearize(self, eta: Tensor, J: Tensor) -> Linearization:
        mu = torch.exp(eta)
        return Linearization(yhat=mu, J=J, V=torch.diag(mu), R=torch.diag(mu.clamp_min(1e-6)))

    def predictive(self, eta: Tensor, var_eta: Tensor) -> Predictive:
        v = var_eta.diagonal(dim1=-2, dim2=-1).clamp_min(0)
        rate = torch.exp(eta + v / 2)
        epistemic = torch.expm1(v) * torch.exp(2 * eta + v)
        return Predictive(mean=rate, epistemic=epistemic, aleatoric=rate)

    def log_predictive(self, y: Tensor, eta: Tensor, var_eta: Tensor) -> Tensor:
        """log of the integral of Poisson(y; exp(e)) N(e; g, v) de, in float64 whatever the dtype.

        Where v is small against the pmf's curvature, v ((y - mu)^2 + mu) < 1e-6 with mu = exp(g)
        (v = 0 included), the integral is the exact pmf with its second-order correction,
        log p(y; g) + log(1 + v/2 ((y - mu)^2 - mu)), error O(v^2); elsewhere 64-point
        Gauss-Hermite quadrature centred on the integrand's mode (adaptive quadrature: accurate in
        the tails too), whose nodes would collapse onto the mean as v vanishes.
        """
        y64, g = y.to(torch.float64), eta.to(torch.float64)
        v = var_eta.diagonal(dim1=-2, dim2=-1).to(torch.float64).clamp_min(0)
        mu = torch.exp(g)
        slope2 = (y64 - mu) ** 2
        small = v * (slope2 + mu) < 1e-6
        exact = y64 * g - mu - torch.lgamma(y64 + 1) + torch.log1p(0.5 * v * (slope2 - mu))
        quad = poisson_lognormal_logpmf(y64, g, torch.where(small, 1.0, v))
        return torch.where(small, exact, quad).sum(-1).to(eta.dtype)

    def pit(self, y: Tensor, eta: Tensor, var_eta: Tensor) -> tuple[Tensor, Tensor]:
        v = var_eta.diagonal(dim1=-2, dim2=-1).clamp_min(0)
        upper = poisson_lognormal_cdf(y, eta, v)
        lower = torch.where(y > 0, poisson_lognormal_cdf((y - 1).clamp_min(0), eta, v), 0.0)
        return lower, upper
