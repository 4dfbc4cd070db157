"""Linear-Gaussian state-space models: a tracker's latent state, filtered exactly (``docs/algorithms.md``
3.11; the online-BNN talk's opening example)::

    theta_t = A(dt_t) theta_{t-1} + w_t,   w_t ~ N(0, Q(dt_t))          theta (n,), A, Q (n, n)
    y_t     = H theta_t + v_t,             v_t ~ N(0, R)                 y (m,), H (m, n), R (m, m)

The parameters the filter tracks are the state itself (D = n), the "network" is y = H theta
(linear, so the Kalman filter is exact) and the dynamics are the transition, evaluated at each
row's time step dt. A row's only input is its dt (``input_dim`` 1): the service builds x = [[dt]]
from an update's ``dt`` (1 when absent), so the log records, replays and answers carry it like any
other input.

Transitions (``transition``):

- ``Fixed(A, Q)``: one step of the chain per unit of time; dt must be a whole number k >= 1 of
  steps, then A_k = A^k and Q_k = sum_{j<k} A^j Q (A^j)^T (k steps with no observation between).
- ``Kinematic(order, dims, q)``: the constant-velocity (order 1; state [p, v], n = 2 dims) or
  constant-acceleration (order 2; [p, v, a], n = 3 dims) model of ``dims`` independent axes,
  coordinates grouped by derivative (all positions, then all velocities, ...). A(dt) is the
  Taylor matrix exp(dt F) of the chain of integrators; Q(dt) is the exact discretisation of
  continuous white noise of intensity q on the highest derivative (Bar-Shalom, Li, Kirubarajan
  2001, 6.2): for order 1, q [[dt^3/3, dt^2/2], [dt^2/2, dt]] per axis; or, when ``q_matrix`` is
  given, Q(dt) = dt Q (a random walk of Q per unit time).

Every function is pure; the transition is computed on the state's dtype and device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from service.errors import InvalidInput, InvalidSpec
from service.filters.ekf import GaussState
from service.filters.jacobians import DenseJacobian, Jacobian
from service.filters.likelihoods import Gaussian, Likelihood
from service.filters.linalg import symmetrise

__all__ = [
    "Fixed",
    "Kinematic",
    "StateSpace",
    "Transition",
    "check_state_space",
    "propagate",
    "time_step",
]

Matrix = tuple[tuple[float, ...], ...]


def _square(name: str, M: Matrix, n: int) -> None:
    if len(M) != n or any(len(row) != n for row in M):
        raise InvalidSpec(f"{name} must be {n} x {n} (the state dimension)")
    if not all(math.isfinite(v) for row in M for v in row):
        raise InvalidSpec(f"{name} holds NaN or infinite values")


def _check_covariance(name: str, Q: Matrix) -> None:
    t = torch.tensor(Q, dtype=torch.float64)
    if not torch.equal(t, t.mT):
        raise InvalidSpec(f"{name} must be symmetric")
    if float(torch.linalg.eigvalsh(t).min()) < -1e-12 * max(1.0, float(t.abs().max())):
        raise InvalidSpec(f"{name} must be positive semi-definite")


def time_step(dt: Tensor | None) -> float:
    """A row's time step as a float: 1 when absent; it must be finite and > 0."""
    if dt is None:
        return 1.0
    value = float(dt)
    if not math.isfinite(value):
        raise InvalidInput(f"dt holds NaN or infinite values ({value!r})")
    if not value > 0:
        raise InvalidInput(f"dt must be > 0 (the time since the previous row), got {value!r}")
    return value


@dataclass(frozen=True)
class Fixed:
    """theta_t = A theta_{t-1} + N(0, Q), one step per unit of time."""

    A: Matrix
    Q: Matrix

    def check(self, n: int) -> None:
        _square("transition", self.A, n)
        _square("process_covariance", self.Q, n)
        _check_covariance("process_covariance", self.Q)

    def at(self, dt: float, like: Tensor) -> tuple[Tensor, Tensor]:
        """(A^k, sum_{j<k} A^j Q A^jT) for dt = k steps."""
        k = round(dt)
        if k < 1 or abs(dt - k) > 1e-9 * max(1.0, dt):
            raise InvalidInput(
                f"dt must be a whole number of steps for a fixed transition, got {dt!r}"
            )
        A = torch.tensor(self.A, dtype=like.dtype, device=like.device)
        Q = torch.tensor(self.Q, dtype=like.dtype, device=like.device)
        Ak, Qk = A, Q
        for _ in range(k - 1):  # Q_{j+1} = A Q_j A^T + Q, A_{j+1} = A A_j
            Ak, Qk = A @ Ak, symmetrise(A @ Qk @ A.mT + Q)
        return Ak, Qk


@dataclass(frozen=True)
class Kinematic:
    """A chain of ``order`` + 1 integrators per axis, ``dims`` axes; white noise of intensity
    ``q`` on the highest derivative, or Q(dt) = dt ``q_matrix``."""

    order: int  # 1: constant velocity, 2: constant acceleration
    dims: int
    q: float = 0.0
    q_matrix: Matrix | None = None

    @property
    def state_dim(self) -> int:
        return (self.order + 1) * self.dims

    def check(self, n: int) -> None:
        if n != self.state_dim:
            raise InvalidSpec(
                f"a {'constant_velocity' if self.order == 1 else 'constant_acceleration'} "
                f"transition of {self.dims} dims has a state of {self.state_dim}, "
                f"not state_dim {n}"
            )
        if self.q_matrix is not None:
            _square("process_covariance", self.q_matrix, n)
            _check_covariance("process_covariance", self.q_matrix)
        elif not (math.isfinite(self.q) and self.q >= 0):
            raise InvalidSpec(f"the white-noise intensity q must be finite and >= 0, got {self.q}")

    def at(self, dt: float, like: Tensor) -> tuple[Tensor, Tensor]:
        """A(dt) = sum_i (dt F)^i / i! (F shifts each derivative into the one below it) and Q(dt)
        = q int_0^dt e^{sF} G G^T e^{sF^T} ds, entry (i, j) = q dt^(2p-i-j+1) / ((p-i)! (p-j)!
        (2p-i-j+1)) over the derivatives i, j in 0..p, times I_dims."""
        p = self.order
        eye = torch.eye(self.dims, dtype=like.dtype, device=like.device)
        a = [[dt ** (j - i) / math.factorial(j - i) if j >= i else 0.0 for j in range(p + 1)]
             for i in range(p + 1)]  # fmt: skip
        A = torch.kron(torch.tensor(a, dtype=like.dtype, device=like.device), eye)
        if self.q_matrix is not None:
            Q = dt * torch.tensor(self.q_matrix, dtype=like.dtype, device=like.device)
            return A, Q
        qs = [
            [
                self.q
                * dt ** (2 * p - i - j + 1)
                / (math.factorial(p - i) * math.factorial(p - j) * (2 * p - i - j + 1))
                for j in range(p + 1)
            ]
            for i in range(p + 1)
        ]
        return A, torch.kron(torch.tensor(qs, dtype=like.dtype, device=like.device), eye)


Transition = Fixed | Kinematic


@dataclass(frozen=True)
class StateSpace:
    """The observation model y = H theta of a state-space model, with its ``transition``.

    >>> net = StateSpace(2, ((1.0, 0.0),), Kinematic(order=1, dims=1, q=0.5))
    >>> net.apply(torch.tensor([3.0, 1.0]), torch.tensor([[0.5]]))
    tensor([[3.]])
    """

    state_dim: int
    H: Matrix
    transition: Transition

    def __post_init__(self) -> None:
        if not isinstance(self.state_dim, int) or self.state_dim < 1:
            raise InvalidSpec(f"state_dim must be a positive integer, got {self.state_dim!r}")
        if not self.H or any(len(row) != self.state_dim for row in self.H):
            raise InvalidSpec(
                f"observation_matrix must have rows of state_dim = {self.state_dim} numbers"
            )
        if not all(math.isfinite(v) for row in self.H for v in row):
            raise InvalidSpec("observation_matrix holds NaN or infinite values")
        self.transition.check(self.state_dim)

    @property
    def input_dim(self) -> int:
        return 1  # the row's time step dt

    @property
    def output_dim(self) -> int:
        return len(self.H)

    @property
    def num_params(self) -> int:
        return self.state_dim

    @property
    def linear_in_params(self) -> bool:
        return True

    @property
    def output_bias(self) -> slice | None:
        return None

    def _H(self, like: Tensor) -> Tensor:
        return torch.tensor(self.H, dtype=like.dtype, device=like.device)

    def apply(self, theta: Tensor, x: Tensor) -> Tensor:
        """H theta for each of the N rows: (N, m), or (S, N, m) for draws theta (S, n)."""
        g = theta @ self._H(theta).mT  # (m,) or (S, m)
        return g.unsqueeze(-2).expand(*theta.shape[:-1], x.shape[0], self.output_dim)

    def jacobian(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(H theta, H) for each row: g (N, m), J (N, m, n)."""
        H = self._H(theta)
        return self.apply(theta, x), H.expand(x.shape[0], *H.shape)

    def jacobian_operator(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Jacobian]:
        g, J = self.jacobian(theta, x)
        return g, DenseJacobian(J)

    @property
    def jacobian_numbers(self) -> int:
        return self.output_dim * self.state_dim

    def init_mean(self, generator: torch.Generator) -> Tensor:
        return torch.zeros(self.state_dim, dtype=torch.float64)

    def at(self, dt: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """(A(dt), Q(dt)) on ``like``'s dtype and device; dt 1 when None."""
        return self.transition.at(time_step(dt), like)


def check_state_space(algorithm: str, likelihood: Likelihood, static: bool) -> None:
    """A state-space model is filtered exactly: the Kalman filter, a gaussian likelihood, and
    its transition as the only dynamics (``static``: the filter's own are the default)."""
    if algorithm != "kalman" or not isinstance(likelihood, Gaussian):
        raise InvalidSpec(
            "a state_space network is filtered by the kalman filter with a gaussian likelihood"
        )
    if not static:
        raise InvalidSpec(
            "a state_space network's dynamics are its transition: leave dynamics unset"
        )


def propagate(state: GaussState, A: Tensor, Q: Tensor) -> GaussState:
    """The Kalman predict step: m' = A m, P' = A P A^T + Q (symmetrised); (n,), (n, n)."""
    return GaussState(mean=A @ state.mean, cov=symmetrise(A @ state.cov @ A.mT + Q))
