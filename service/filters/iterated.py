"""The iterated update of a non-Gaussian row: Laplace at the one-row mode (``docs/algorithms.md`` 2.5).

The moment-matched EKF (section 2.1) linearises mu(eta) once, at the predicted mean m. With a log
link that can be far off: a count y = 100 against a predicted rate of 1 moves eta by about
y Omega, the rate exp(eta) overflows, and every later step is rejected. The iterated update keeps
the network linearised at m, as the EKF does,

    eta(theta) = eta_0 + J (theta - m),     eta_0 = g(m, x) (C,),   J = dg/dtheta at m (C, D)

but conditions on the row's own likelihood under that linearisation, by the Laplace approximation
at the mode of the one-row posterior: the iterated EKF, which is Gauss-Newton on the one-step MAP
objective (Bell & Cathey 1993), with a backtracking line search (Skoglund, Hendeby & Axehill 2015).
The mode lies in m + Sigma J^T w, so it solves a C-dimensional problem:

    max_w  L(w) = log p(y | eta_0 + Omega w) - w^T Omega w / 2,       Omega = J Sigma J^T (C, C)

Every family here has a canonical link: grad log p = y - mu(eta), -hess log p = V(eta) = dmu/deta
(``hessian``), so L is concave. With r = y - mu(eta) - w, a Newton step in w is

    d = (I + V Omega)^{-1} r,        dL(w + alpha d)/dalpha at 0 = r^T Omega d >= 0

A step takes the largest alpha in {1, 1/2, ..., 2^-15} with L(w + alpha d) >= L(w) + 1e-4
alpha r^T Omega d - 1e-10 (1 + |L(w)|) (Armijo, less a rounding tolerance; a candidate whose L
is not finite fails), else stays (alpha = 0). All candidates are evaluated at once, in float64:
no host sync, and the result depends on the inputs alone. On the CPU (not while traced for a
compiled step) the loop stops early, after taking a Newton step that moves eta by at most
1e-12 (1 + |eta|): reading a CPU tensor costs no device sync.

The filter then conditions on the Laplace linearisation at eta* = eta_0 + Omega w*:

    Lambda = R(eta*)                 the family's moment-matched R at the mode (C, C), > 0
    yhat   = y - (I + Lambda Omega) w*,      V = R = Lambda

Since S = Lambda Omega Lambda + Lambda = (Lambda Omega + I) Lambda, every filter's mean step
V^T S^{-1} (y - yhat) is exactly w*: m_+ = m + Sigma J^T w*, and the information it adds is
J^T Lambda J, the curvature at the mode. With ``iterations = 0`` the update is the moment-matched
EKF's (``Likelihood.linearize`` at m).

References: B. M. Bell, F. W. Cathey (1993), "The iterated Kalman filter update as a Gauss-Newton
method", IEEE TAC 38(2); M. A. Skoglund, G. Hendeby, D. Axehill (2015), "Extended Kalman filter
modifications based on an optimization view point", FUSION 2015.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from service.filters.base import Linearization
from service.filters.likelihoods import Likelihood
from service.filters.linalg import (
    Check,
    finite_check,
    identity,
    may_stop_early,
    shared_constant,
)
from service.filters.networks import DenseJacobian

if TYPE_CHECKING:
    from service.filters.algorithm import Belief
    from service.filters.online import OnlineFilter

__all__ = [
    "IteratedLikelihood",
    "laplace",
    "mode_weights",
    "row_linearization",
    "updated_prediction_check",
]

#: The step sizes tried at each iteration, largest first: 1, 1/2, ..., 2^-15.
_HALVINGS = 16
#: Armijo's sufficient-increase constant.
_ARMIJO = 1e-4
#: Relative change of L below rounding: near the mode a Newton step changes L by about the square
#: of its length, which rounding would hide from the test from a length of about 1e-8 on; the
#: tolerance lets those steps through, so that the mode is found to full precision.
_ROUNDING = 1e-10
#: On the CPU the steps stop once a Newton step moves eta by no more than this, relative to
#: 1 + |eta| (that step is taken).
_STILL = 1e-12


@runtime_checkable
class IteratedLikelihood(Likelihood, Protocol):
    """A likelihood with a canonical link whose update can be iterated (module docstring)."""

    @property
    def iterations(self) -> int:
        """Damped Newton steps towards the one-row mode; 0: the moment-matched EKF update."""
        ...

    def hessian(self, eta: Tensor) -> Tensor:
        """V(eta) = dmu/deta = -d^2 log p / deta^2, (..., C, C), positive semi-definite."""
        ...


@shared_constant
def _alphas(device: torch.device) -> Tensor:
    """(H + 1, 1) float64: the step sizes 1, 1/2, ..., 2^-(H-1), then 0 (stay)."""
    exponents = torch.arange(_HALVINGS, dtype=torch.float64, device=device)
    steps = torch.cat([torch.pow(2.0, -exponents), exponents.new_zeros(1)])
    return steps.unsqueeze(-1)


@shared_constant
def _stay(device: torch.device) -> Tensor:
    """(H + 1,) bool: True at the last candidate, alpha = 0, which is always acceptable."""
    stay = torch.zeros(_HALVINGS + 1, dtype=torch.bool, device=device)
    stay[-1] = True
    return stay


def mode_weights(
    likelihood: IteratedLikelihood, y: Tensor, eta0: Tensor, Omega: Tensor, iterations: int
) -> Tensor:
    """w (C,) float64 after ``iterations`` damped Newton steps on L(w) from w = 0.

    y, eta0 (C,) and Omega = J Sigma J^T (C, C) at the predicted mean; eta = eta0 + Omega w. The
    candidates of a step are w + alpha d for each alpha (module docstring) and alpha = 0; the
    first that passes Armijo's test is taken, so a step never lowers L.
    """
    y, eta0, Omega = y.double(), eta0.double(), Omega.double()
    alphas, stay = _alphas(eta0.device), _stay(eta0.device)
    armijo = _ARMIJO * alphas[:, 0]
    one = eta0.shape[-1] == 1  # then V = variance_diag, and the solve is a division
    eye = identity(eta0.shape[-1], eta0.dtype, eta0.device)
    w, eta, L = torch.zeros_like(eta0), eta0, likelihood.log_prob(y, eta0)
    early = may_stop_early(eta0)
    for _ in range(iterations):
        r = y - likelihood.mean(eta) - w
        if one:
            d = r / (1 + likelihood.variance_diag(eta) * Omega[0])
        else:
            d = torch.linalg.solve_ex(eye + likelihood.hessian(eta) @ Omega, r)[0]
        Od = Omega @ d
        if early and bool(Od.abs().max() <= _STILL * (1 + eta.abs().max())):
            return w + d  # the full step moves eta by rounding: taken, and the mode is reached
        W = w + alphas * d  # (H + 1, C), the largest step first
        E = eta + alphas * Od  # eta0 + Omega W
        cand = likelihood.log_prob(y, E) - 0.5 * (W * (E - eta0)).sum(-1)
        ok = (cand >= L + armijo * (r @ Od) - _ROUNDING * (1 + L.abs())) | stay  # NaN fails
        first = ok.to(torch.uint8).argmax().reshape(1)  # the first True
        w, eta = W.index_select(0, first)[0], E.index_select(0, first)[0]
        L = cand.index_select(0, first)[0]
    return w


def laplace(
    likelihood: IteratedLikelihood, y: Tensor, eta0: Tensor, Omega: Tensor, J: Tensor
) -> Linearization:
    """The Laplace linearisation at the one-row mode (module docstring), in eta0's dtype.

    y, eta0 (C,), Omega = J Sigma J^T (C, C) of the predicted belief, J (C, D).
    """
    w64 = mode_weights(likelihood, y, eta0, Omega, likelihood.iterations)
    eta = (eta0.double() + Omega.double() @ w64).to(eta0.dtype)
    w = w64.to(eta0.dtype)
    Lam = likelihood.linearize(eta, J).R
    return Linearization(yhat=y - w - Lam @ (Omega @ w), J=J, V=Lam, R=Lam)


def row_linearization(
    f: OnlineFilter[Any], state: Belief, eta: Tensor, J: Tensor, y: Tensor
) -> Linearization:
    """The linearisation ``f`` conditions one row on: eta (C,) and J (1, C, D) at the predicted
    mean of ``state``, y (C,). The likelihood's moment-matched one when it does not iterate
    (the gaussian, or ``iterations = 0``), else ``laplace`` with Omega = J Sigma J^T."""
    lik = f.likelihood
    # the attribute first: a runtime protocol's isinstance costs more than a small step's math
    if not getattr(lik, "iterations", 0) or not isinstance(lik, IteratedLikelihood):
        return lik.linearize(eta, J[0])
    Omega = f.algorithm.project(state, DenseJacobian(J))[0]
    return laplace(lik, y, eta, Omega, J[0])


def updated_prediction_check(f: OnlineFilter[Any], new: Belief, x: Tensor) -> Check:
    """Deferred: the predictive of the updated belief ``new`` at the row x (1, I) is finite
    (``docs/algorithms.md`` 6.4); a step that fails it is rejected, so that no accepted step
    leaves a model that cannot predict the row it learnt from."""
    eta, J = f.network.jacobian_operator(new.mean, x)
    post = f.likelihood.predictive(eta, f.algorithm.project(new, J))
    return finite_check("the updated model's prediction of the row", post.mean, post.variance)
