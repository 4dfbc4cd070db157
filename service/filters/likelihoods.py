"""Observation models, moment-matched to Gaussians (``docs/algorithms.md`` section 2).

The network outputs eta = g(theta, x): the regression mean (gaussian), a logit (bernoulli), K
logits (categorical) or a log-rate (poisson). Each family gives the mean mu(eta) and variance V(eta)
of its sufficient statistic; the filters then see the Gaussian

    y | theta ~ N( mu(eta), R ),   linearised as   H = d mu / d theta = V(eta) J,   R = V(eta_m)

with J = dg/dtheta and everything evaluated at the predicted mean m. The information added per step
is H^T R^{-1} H = J^T V J, the GLM Fisher information. (Linearising eta itself, H = J with R = V, adds
J^T V^{-1} J instead: the error found in rebayes-mini's ``ExpfamFilter``; the tests guard against it.)

=================  =====================  ===================================  ==============
family             mu(eta)                V(eta)                               R used
=================  =====================  ===================================  ==============
gaussian           eta                    I (identity link)                    diag(noise)
bernoulli          sigmoid(eta)           mu (1 - mu)                          mu_c (1 - mu_c)
categorical        softmax(eta)           diag(mu) - mu mu^T  (singular)       V + eps I
poisson            exp(eta)               mu                                   max(mu, 1e-6)
=================  =====================  ===================================  ==============

Choices where the design leaves room, following rebayes (the paper's code,
``utils/models.py :: _initialize_classification``): bernoulli clips the mean to
[1e-4, 1 - 1e-4] (mu_c), so H = 0 once the output saturates; categorical adds eps = 1e-3 to the
diagonal of R. Poisson (not in rebayes) floors R at 1e-6 so the innovation stays positive definite.

Predictive for a row whose output has linearised variance Var[eta] = J Sigma J^T:

* gaussian: N(eta, J Sigma J^T + R) exactly for a linear network;
* bernoulli / categorical: the probit approximation p = softmax(eta / sqrt(1 + pi diag(Var[eta]) / 8))
  (sigmoid for binary; ``docs/algorithms.md`` 2.2); epistemic = diag(V Var[eta] V^T) (the delta-method
  variance of mu), aleatoric = p (1 - p) - epistemic (floored at 0) so the total is p (1 - p);
* poisson: eta ~ N(g, v) makes the rate log-normal: E[rate] = exp(g + v/2) (aleatoric),
  Var[rate] = (exp(v) - 1) exp(2g + v) (epistemic); the log predictive mass integrates the Poisson
  pmf over eta by 64-point Gauss-Hermite quadrature centred on the integrand's mode.

``pit`` gives the predictive CDF at the label, for calibration: gaussian Phi((y - eta) / sd) per
output with sd^2 = Var[eta]_cc + r_c; poisson the Poisson-lognormal CDF
F(k) = E[Q(k + 1, exp(eta))] over eta ~ N(g, v) (Q the regularised upper incomplete gamma
function; see ``service.filters.quadrature``) at k = y - 1 and k = y. Poisson lives in
``service.filters.counts``; the iterated update of the three non-gaussian families in
``service.filters.iterated``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from service.errors import InvalidInput, InvalidSpec
from service.filters.base import Linearization, Predictive
from service.filters.linalg import cholesky, not_finite, shared_constant

__all__ = ["ITERATIONS", "Bernoulli", "Categorical", "Gaussian", "Likelihood"]

_LOG_2PI = math.log(2 * math.pi)


@runtime_checkable
class Likelihood(Protocol):
    """What a filter needs of an observation model."""

    @property
    def name(self) -> str: ...

    def check_output_dim(self, output_dim: int) -> None:
        """Raise InvalidSpec if the family cannot have ``output_dim`` network outputs."""
        ...

    def encode(self, y: Tensor, output_dim: int) -> Tensor:
        """Validate targets and return their sufficient statistics (N, C); raise InvalidInput."""
        ...

    def restrict(self, k: int) -> Likelihood:
        """The likelihood of output k observed alone, the others unobserved
        (``service.filters.outputs``); InvalidInput where one observation covers every output."""
        ...

    def mean(self, eta: Tensor) -> Tensor:
        """mu(eta), (..., C)."""
        ...

    @property
    def mean_needs_variance(self) -> bool:
        """Whether the mean of ``predictive`` depends on Var[eta] (the probit and log-normal means
        do). Where it does not, that mean is ``mean(eta)``, one forward pass
        (``OnlineFilter.predictive_mean``)."""
        ...

    def variance_diag(self, eta: Tensor) -> Tensor:
        """diag V(eta) = Var[y | theta] per output, (..., C)."""
        ...

    def log_prob(self, y: Tensor, eta: Tensor) -> Tensor:
        """log p(y | eta) for encoded y, summed over outputs: (...)."""
        ...

    def linearize(self, eta: Tensor, J: Tensor) -> Linearization:
        """The moment-matched Gaussian for one row: eta (C,), J (C, D)."""
        ...

    def predictive(self, eta: Tensor, var_eta: Tensor) -> Predictive:
        """Linearised predictive for eta (N, C) with Var[eta] = J Sigma J^T (N, C, C)."""
        ...

    def log_predictive(self, y: Tensor, eta: Tensor, var_eta: Tensor) -> Tensor:
        """log p(y) under the linearised predictive, (N,), for encoded y (N, C)."""
        ...

    def pit(self, y: Tensor, eta: Tensor, var_eta: Tensor) -> tuple[Tensor, Tensor] | None:
        """(F(y-), F(y)) per output (N, C) under the predictive's marginals, for calibration.

        Equal for continuous outputs; ``None`` for class labels (which have no order).
        """
        ...


def _as_rows(y: Tensor, output_dim: int, what: str) -> Tensor:
    if y.ndim == 1 and output_dim == 1:
        y = y.unsqueeze(-1)
    if y.ndim != 2 or y.shape[1] != output_dim:
        raise InvalidInput(
            f"{what}: y must have shape (rows,) or (rows, {output_dim}), got {tuple(y.shape)}"
        )
    if not math.isfinite(float(y.sum())):  # as all_finite: two ops and a sync, not six
        raise InvalidInput(f"{what}: {not_finite('y', y.dtype)}")
    return y


@shared_constant
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, made once per dtype and device (never written to)."""
    return torch.tensor(values, dtype=dtype, device=device)


def _require_single_output(name: str, output_dim: int) -> None:
    if output_dim != 1:
        raise InvalidSpec(f"a {name} likelihood needs output_dim 1, got {output_dim}")


#: Default damped Newton steps of a non-Gaussian update (``service.filters.iterated``).
ITERATIONS = 10
MAX_ITERATIONS = 100


def _check_iterations(name: str, iterations: object) -> None:
    if type(iterations) is not int or not 0 <= iterations <= MAX_ITERATIONS:
        raise InvalidSpec(f"{name} iterations must be an integer in [0, {MAX_ITERATIONS}]")


def _probit_scale(var_eta: Tensor) -> Tensor:
    """1 / sqrt(1 + pi v / 8) per output, from the diagonal of Var[eta] (N, C, C)."""
    v = var_eta.diagonal(dim1=-2, dim2=-1).clamp_min(0)
    return torch.rsqrt(1 + math.pi * v / 8)


@dataclass(frozen=True)
class Gaussian:
    """y ~ N(eta, diag(noise_variance)); a scalar variance is shared by all outputs."""

    noise_variance: float | tuple[float, ...] = 1.0
    name: str = field(default="gaussian", init=False)

    def __post_init__(self) -> None:
        r = self._r_list()
        if not r or not all(math.isfinite(v) and v > 0 for v in r):
            raise InvalidSpec(f"noise_variance must be finite and > 0, got {self.noise_variance!r}")

    def _r_list(self) -> list[float]:
        nv = self.noise_variance
        return [float(v) for v in nv] if isinstance(nv, tuple) else [float(nv)]

    def check_output_dim(self, output_dim: int) -> None:
        n = len(self._r_list())
        if n not in (1, output_dim):
            raise InvalidSpec(
                f"noise_variance has {n} entries but the network has {output_dim} outputs"
            )

    def r(self, like: Tensor) -> Tensor:
        """The noise variances as a (C,) tensor on ``like``'s dtype and device."""
        return _constant(tuple(self._r_list()), like.dtype, like.device).expand(like.shape[-1])

    def encode(self, y: Tensor, output_dim: int) -> Tensor:
        return _as_rows(y, output_dim, "gaussian")

    def restrict(self, k: int) -> Gaussian:
        """Output k's noise variance r_k alone (the noise is independent across outputs)."""
        r = self._r_list()
        return self if len(r) == 1 else Gaussian(r[k])

    def mean(self, eta: Tensor) -> Tensor:
        return eta

    @property
    def mean_needs_variance(self) -> bool:
        return False

    def variance_diag(self, eta: Tensor) -> Tensor:
        return self.r(eta).expand(eta.shape)

    def log_prob(self, y: Tensor, eta: Tensor) -> Tensor:
        r = self.r(eta)
        return -0.5 * (((y - eta) ** 2) / r + torch.log(r) + _LOG_2PI).sum(-1)

    def linearize(self, eta: Tensor, J: Tensor) -> Linearization:
        return Linearization(yhat=eta, J=J, V=None, R=torch.diag(self.r(eta)))

    def predictive(self, eta: Tensor, var_eta: Tensor) -> Predictive:
        epistemic = var_eta.diagonal(dim1=-2, dim2=-1)
        return Predictive(mean=eta, epistemic=epistemic, aleatoric=self.r(eta).expand(eta.shape))

    def log_predictive(self, y: Tensor, eta: Tensor, var_eta: Tensor) -> Tensor:
        if eta.shape[-1] == 1:  # one output: the density of a number, no factorisation
            s = var_eta[..., 0, 0] + self.r(eta)[0]
            e = (y - eta)[..., 0]
            return -0.5 * (e * e / s + torch.log(s) + _LOG_2PI)
        S = var_eta + torch.diag_embed(self.r(eta).expand(eta.shape))
        L = cholesky(S, what="predictive covariance")
        z: Tensor = torch.linalg.solve_triangular(L, (y - eta).unsqueeze(-1), upper=False)
        z = z.squeeze(-1)
        logdet = 2 * torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)
        return -0.5 * ((z * z).sum(-1) + logdet + eta.shape[-1] * _LOG_2PI)

    def pit(self, y: Tensor, eta: Tensor, var_eta: Tensor) -> tuple[Tensor, Tensor]:
        sd = torch.sqrt(var_eta.diagonal(dim1=-2, dim2=-1).clamp_min(0) + self.r(eta))
        u = torch.special.ndtr((y - eta) / sd)
        return u, u


@dataclass(frozen=True)
class Bernoulli:
    """y in {0, 1}, P(y = 1) = sigmoid(eta). ``clip`` bounds the mean used in the update;
    ``iterations``: damped Newton steps of the update (0: moment-matched at the mean)."""

    clip: float = 1e-4
    iterations: int = field(default=ITERATIONS, kw_only=True)
    name: str = field(default="bernoulli", init=False)

    def __post_init__(self) -> None:
        _check_iterations(self.name, self.iterations)

    def check_output_dim(self, output_dim: int) -> None:
        _require_single_output(self.name, output_dim)

    def restrict(self, k: int) -> Bernoulli:
        return self  # one output: observing it is observing all

    def encode(self, y: Tensor, output_dim: int) -> Tensor:
        y = _as_rows(y, 1, "bernoulli")
        if not bool(((y == 0) | (y == 1)).all()):
            raise InvalidInput("bernoulli: every y must be 0 or 1")
        return y

    def mean(self, eta: Tensor) -> Tensor:
        return torch.sigmoid(eta)

    def hessian(self, eta: Tensor) -> Tensor:
        return torch.diag_embed(torch.sigmoid(eta) * torch.sigmoid(-eta))

    @property
    def mean_needs_variance(self) -> bool:
        return True

    def variance_diag(self, eta: Tensor) -> Tensor:
        mu = torch.sigmoid(eta)
        return mu * (1 - mu)

    def log_prob(self, y: Tensor, eta: Tensor) -> Tensor:
        return (
            y * torch.nn.functional.logsigmoid(eta) + (1 - y) * torch.nn.functional.logsigmoid(-eta)
        ).sum(-1)

    def linearize(self, eta: Tensor, J: Tensor) -> Linearization:
        mu = torch.sigmoid(eta)
        mu_c = mu.clamp(self.clip, 1 - self.clip)
        slope = torch.where(mu_c == mu, mu * (1 - mu), torch.zeros_like(mu))
        return Linearization(yhat=mu_c, J=J, V=torch.diag(slope), R=torch.diag(mu_c * (1 - mu_c)))

    def predictive(self, eta: Tensor, var_eta: Tensor) -> Predictive:
        p = torch.sigmoid(eta * _probit_scale(var_eta))
        v = self.variance_diag(eta)
        epistemic = v * v * var_eta.diagonal(dim1=-2, dim2=-1)
        return Predictive(
            mean=p, epistemic=epistemic, aleatoric=(p * (1 - p) - epistemic).clamp_min(0)
        )

    def log_predictive(self, y: Tensor, eta: Tensor, var_eta: Tensor) -> Tensor:
        return self.log_prob(y, eta * _probit_scale(var_eta))

    def pit(self, y: Tensor, eta: Tensor, var_eta: Tensor) -> None:
        return None


@dataclass(frozen=True)
class Categorical:
    """y in {0, ..., C-1} (encoded one-hot); P(y = k) = softmax(eta)_k. ``eps`` regularises R;
    ``iterations`` as for Bernoulli."""

    eps: float = 1e-3
    iterations: int = field(default=ITERATIONS, kw_only=True)
    name: str = field(default="categorical", init=False)

    def __post_init__(self) -> None:
        _check_iterations(self.name, self.iterations)

    def check_output_dim(self, output_dim: int) -> None:
        if output_dim < 2:
            raise InvalidSpec(f"a categorical likelihood needs output_dim >= 2, got {output_dim}")

    def restrict(self, k: int) -> Categorical:
        raise InvalidInput(
            "outputs: a categorical observation (one class label) is of every class at once; "
            "it cannot observe one output alone"
        )

    def encode(self, y: Tensor, output_dim: int) -> Tensor:
        if y.ndim != 1:
            raise InvalidInput(
                f"categorical: y must be a vector of class indices, got shape {tuple(y.shape)}"
            )
        if not bool(torch.isfinite(y).all()) or not bool((y == torch.round(y)).all()):
            raise InvalidInput("categorical: every y must be an integer class index")
        if bool(((y < 0) | (y >= output_dim)).any()):
            raise InvalidInput(f"categorical: class index out of range [0, {output_dim - 1}]")
        return torch.nn.functional.one_hot(y.long(), output_dim).to(
            y.dtype if y.is_floating_point() else torch.float64
        )

    def mean(self, eta: Tensor) -> Tensor:
        return torch.softmax(eta, dim=-1)

    @property
    def mean_needs_variance(self) -> bool:
        return True

    def variance_diag(self, eta: Tensor) -> Tensor:
        mu = torch.softmax(eta, dim=-1)
        return mu * (1 - mu)

    def log_prob(self, y: Tensor, eta: Tensor) -> Tensor:
        return (y * torch.log_softmax(eta, dim=-1)).sum(-1)

    def hessian(self, eta: Tensor) -> Tensor:
        """V(eta) = dmu/deta = diag(mu) - mu mu^T, (..., C, C): singular (V 1 = 0)."""
        mu = torch.softmax(eta, dim=-1)
        return torch.diag_embed(mu) - mu.unsqueeze(-1) * mu.unsqueeze(-2)

    def linearize(self, eta: Tensor, J: Tensor) -> Linearization:
        V = self.hessian(eta)
        R = V + self.eps * torch.eye(eta.shape[-1], dtype=eta.dtype, device=eta.device)
        return Linearization(yhat=torch.softmax(eta, dim=-1), J=J, V=V, R=R)

    def predictive(self, eta: Tensor, var_eta: Tensor) -> Predictive:
        p = torch.softmax(eta * _probit_scale(var_eta), dim=-1)
        V = self.hessian(eta)
        epistemic = (V @ var_eta @ V.mT).diagonal(dim1=-2, dim2=-1)
        return Predictive(
            mean=p, epistemic=epistemic, aleatoric=(p * (1 - p) - epistemic).clamp_min(0)
        )

    def log_predictive(self, y: Tensor, eta: Tensor, var_eta: Tensor) -> Tensor:
        return self.log_prob(y, eta * _probit_scale(var_eta))

    def pit(self, y: Tensor, eta: Tensor, var_eta: Tensor) -> None:
        return None
