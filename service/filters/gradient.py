"""Point estimates by gradient steps: online SGD and replay-buffer SGD (``docs/algorithms.md``
3.10), the talk's baselines, with the filters' contract.

Their belief is a point: theta_t (D,) and no covariance, so the predictive's epistemic variance
is 0 (the variance is the likelihood's aleatoric part alone), Thompson draws are the mean, and
``project`` is 0. One row (x_t, y_t), with the loss l(theta; x, y) = -log p(y | g(theta, x)) of
the model's likelihood (the gaussian at unit noise, half the squared error, as the warm-up of
3.9: the learning rate does not scale with the noise variance)::

    sgd:         theta_t = theta_{t-1} - lr grad l(theta_{t-1}; x_t, y_t)
    replay_sgd:  the buffer keeps the last k rows (x_t's included); then ``steps`` times
                 theta <- theta - lr (1/n) sum_{rows in the buffer} grad l(theta; x, y)
                 n = the rows held (fewer than k until k rows have been seen)

(the talk's replay-buffer SGD with one step; rebayes' ``FifoTrainState`` keeps the same buffer).

``optimizer="adam"`` replaces each step theta <- theta - lr grad by Adam's (Kingma & Ba 2015, as
``torch.optim.Adam`` without weight decay, and as the optax.adam of rebayes' SGD baselines)::

    t <- t + 1,   m1 <- b1 m1 + (1 - b1) grad,   m2 <- b2 m2 + (1 - b2) grad^2
    theta <- theta - (lr / (1 - b1^t)) m1 / (sqrt(m2) / sqrt(1 - b2^t) + eps)

with its moments m1, m2 (D,) and step count t in the state (a replay step of ``steps`` inner
steps counts ``steps``). The dynamics' decay scales theta (not the moments); process noise has
nothing to act on. A row observing one output (``outputs``, 3.8) contributes that output's loss
alone, in the step and in the buffer.

=========  ==========  =================================================================
field      shape       meaning
=========  ==========  =================================================================
mean       (D,)        theta
xs         (k, I)      the buffer's rows, oldest first (replay only)
ys         (k, C)      their encoded labels (a partial row: its number at its output)
mask       (k, C)      1 where a label is observed: all of a full row, one output of a
                       partial row, nothing in a slot not filled yet
m1, m2     (D,)        Adam's first and second moments (``optimizer="adam"`` only)
steps      ()          Adam's step count t, in the state's dtype (``optimizer="adam"`` only)
=========  ==========  =================================================================

A plain-SGD state leaves the three Adam fields ``None``: what it stores is theta (and the buffer)
alone, as before they existed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from service.filters.algorithm import state_tensors
from service.filters.base import Linearization, StepInfo
from service.filters.likelihoods import Gaussian, Likelihood
from service.filters.linalg import Check, finite_check
from service.filters.networks import Jacobian, Network

if TYPE_CHECKING:
    from service.filters.online import OnlineFilter

__all__ = [
    "SGD",
    "PointState",
    "ReplaySGD",
    "ReplayState",
    "learned",
    "loss_likelihood",
    "point_estimate",
    "variational",
]


def variational(algorithm: object) -> bool:
    """Whether a learner (an algorithm with ``learn``) keeps a posterior (``ivon``)."""
    return bool(getattr(algorithm, "variational", False))


def point_estimate(algorithm: object) -> bool:
    """Whether an algorithm keeps a point estimate (``sgd``, ``replay_sgd``): no covariance."""
    return hasattr(algorithm, "learn") and not variational(algorithm)


def loss_likelihood(likelihood: Likelihood) -> Likelihood:
    """The likelihood whose negative log density is the loss: the gaussian at unit noise."""
    return Gaussian(1.0) if likelihood.name == "gaussian" else likelihood


def _observed(network: Network) -> tuple[Network, int | None]:
    """(the full network, the output a restricted row observes or None)."""
    from service.filters.outputs import OutputOf

    if isinstance(network, OutputOf):
        return network.network, network.k
    return network, None


def _losses(likelihood: Likelihood, g: Tensor, Y: Tensor, mask: Tensor) -> Tensor:
    """The loss of each row (N,), summed over its observed outputs: g, Y, mask (N, C)."""
    lik = loss_likelihood(likelihood)
    if lik.name == "gaussian":
        return 0.5 * (mask * (Y - g) ** 2).sum(-1)
    return -lik.log_prob(Y, g) * mask[:, 0]


@dataclass(frozen=True)
class PointState:
    """A point estimate: ``mean`` theta (D,), and Adam's moments and step count where it steps
    by Adam."""

    mean: Tensor
    m1: Tensor | None = None
    m2: Tensor | None = None
    steps: Tensor | None = None


@dataclass(frozen=True)
class ReplayState:
    """theta and the buffer of the last k rows (module docstring)."""

    mean: Tensor
    xs: Tensor
    ys: Tensor
    mask: Tensor
    m1: Tensor | None = None
    m2: Tensor | None = None
    steps: Tensor | None = None


Optimizer = Literal["sgd", "adam"]


class _Point:
    """What both SGDs share: a belief without covariance, stepped by SGD or Adam."""

    name: str
    learning_rate: float
    optimizer: Optimizer
    beta1: float
    beta2: float
    eps: float

    def check_model(self, network: Network, likelihood: Likelihood) -> None:
        """Every network and likelihood."""

    def project(self, state: PointState | ReplayState, J: Jacobian) -> Tensor:
        N, C, _ = J.shape
        mean = state.mean
        return mean.new_zeros((N, C, C))

    def condition_on(
        self, state: PointState | ReplayState, lin: Linearization, y: Tensor
    ) -> tuple[PointState | ReplayState, Tensor, tuple[Check, ...]]:
        raise TypeError(f"{self.name} learns by gradient steps (``learn``), not by conditioning")

    def validity(self, state: PointState | ReplayState) -> tuple[Check, ...]:
        moments = [t for t in (state.m1, state.m2) if t is not None]
        return (finite_check("the parameters", state.mean, *moments),)

    def sample(
        self, state: PointState | ReplayState, n: int, generator: torch.Generator | None
    ) -> Tensor:
        """The point itself, n times: a point estimate has nothing to draw."""
        return state.mean.expand(n, -1).clone()

    def covariance(self, state: PointState | ReplayState) -> Tensor:
        D = state.mean.shape[0]
        return state.mean.new_zeros((D, D))

    def state_bytes(self, state: PointState | ReplayState) -> int:
        return sum(t.numel() * t.element_size() for t in state_tensors(state).values())

    def _moments(self, mean: Tensor) -> dict[str, Tensor]:
        """The initial Adam fields of a state with theta ``mean`` (none for plain SGD)."""
        if self.optimizer != "adam":
            return {}
        return {"m1": torch.zeros_like(mean), "m2": torch.zeros_like(mean),
                "steps": mean.new_zeros(())}  # fmt: skip

    def _step(
        self,
        network: Network,
        likelihood: Likelihood,
        state: PointState | ReplayState,
        theta: Tensor,
        x: Tensor,
        Y: Tensor,
        mask: Tensor,
        rows: Tensor | int = 1,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One step from theta on the loss summed over the rows x (n, I), Y and mask (n, C),
        over ``rows`` (the rows held): the new theta and, for Adam, the new moment fields
        (read from ``state``, the state being stepped)."""
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            loss = _losses(likelihood, network.apply(t, x), Y, mask).sum() / rows
            (grad,) = torch.autograd.grad(loss, t)
        if self.optimizer != "adam":
            return theta - self.learning_rate * grad, {}
        assert state.m1 is not None and state.m2 is not None and state.steps is not None
        b1, b2 = self.beta1, self.beta2
        steps = state.steps + 1
        m1 = torch.lerp(state.m1, grad, 1 - b1)  # b1 m1 + (1 - b1) grad, as torch's Adam
        m2 = b2 * state.m2 + (1 - b2) * grad * grad
        size = self.learning_rate / (1 - b1**steps)
        denom = m2.sqrt() / (1 - b2**steps).sqrt() + self.eps
        return theta - size * (m1 / denom), {"m1": m1, "m2": m2, "steps": steps}


def _full_row(network: Network, k: int | None, y: Tensor) -> tuple[Tensor, Tensor]:
    """The encoded label y of one row as (C,) and its mask (C,) over the full network's
    outputs (a restricted row, y (1,): its number at output k, the others unobserved)."""
    if k is None:
        return y, torch.ones_like(y)
    mask = torch.zeros(network.output_dim, dtype=y.dtype, device=y.device)
    mask[k] = 1.0
    return mask * y[0], mask


def learned(
    f: OnlineFilter[Any], state: Any, x: Tensor, y: Tensor
) -> tuple[Any, StepInfo, list[Check]]:
    """``OnlineFilter._update`` for a learner: the row's report from the belief before the
    step (a point estimate's with epistemic variance 0; a variational learner's, ``ivon``, from
    its Gaussian), the step, and its checks (the parameters and the updated model's prediction
    of the row finite)."""
    if variational(f.algorithm):  # a posterior: the predictive of its Gaussian
        eta, J = f.network.jacobian_operator(state.mean, x)
        var_eta = f.algorithm.project(state, J)
    else:
        eta = f.network.apply(state.mean, x)
        C = eta.shape[-1]
        var_eta = eta.new_zeros((1, C, C))
    pred = f.likelihood.predictive(eta, var_eta)
    loglik = f.likelihood.log_predictive(y.unsqueeze(0), eta, var_eta)[0]
    new = f.algorithm.learn(f.network, f.likelihood, state, x, y)  # type: ignore[attr-defined]
    after = f.network.apply(new.mean, x)
    checks = [
        *f.algorithm.validity(new),
        finite_check("the pre-update prediction", pred.mean, pred.variance, loglik),
        finite_check("the updated model's prediction of the row", after),
    ]
    return new, StepInfo(pred, loglik, eta, var_eta), checks


@dataclass(frozen=True)
class SGD(_Point):
    """Online SGD: one gradient step on each row's loss (by Adam's rule where ``optimizer`` is
    ``"adam"``)."""

    learning_rate: float
    name: str = "sgd"
    optimizer: Optimizer = "sgd"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def init(self, mean: Tensor, variance: float | Tensor) -> PointState:
        return PointState(mean=mean, **self._moments(mean))

    def predict(self, state: PointState, decay: float, process_noise: float) -> PointState:
        return state if decay == 1.0 else replace(state, mean=decay * state.mean)

    def learn(
        self, network: Network, likelihood: Likelihood, state: PointState, x: Tensor, y: Tensor
    ) -> PointState:
        """One step on the row x (1, I), y encoded (C,) for ``network``."""
        full, k = _observed(network)
        Y, mask = _full_row(full, k, y)
        theta, moments = self._step(full, likelihood, state, state.mean, x, Y[None], mask[None])
        return PointState(theta, **moments)


@dataclass(frozen=True)
class ReplaySGD(_Point):
    """Replay-buffer SGD over the last ``buffer`` rows, ``steps`` gradient steps a row; its
    buffer's shapes come from the network it serves (``input_dim``, ``output_dim``)."""

    learning_rate: float
    buffer: int
    input_dim: int
    output_dim: int
    steps: int = 1
    name: str = "replay_sgd"
    optimizer: Optimizer = "sgd"
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def init(self, mean: Tensor, variance: float | Tensor) -> ReplayState:
        k, I, C = self.buffer, self.input_dim, self.output_dim
        return ReplayState(
            mean=mean, xs=mean.new_zeros((k, I)), ys=mean.new_zeros((k, C)),
            mask=mean.new_zeros((k, C)), **self._moments(mean),
        )  # fmt: skip

    def predict(self, state: ReplayState, decay: float, process_noise: float) -> ReplayState:
        if decay == 1.0:
            return state
        return replace(state, mean=decay * state.mean)

    def learn(
        self, network: Network, likelihood: Likelihood, state: ReplayState, x: Tensor, y: Tensor
    ) -> ReplayState:
        """Push the row x (1, I), y encoded (C,) into the buffer, then ``steps`` steps on it."""
        full, k = _observed(network)
        Y, mask = _full_row(full, k, y)
        xs = torch.cat([state.xs[1:], x.to(state.xs)])
        ys = torch.cat([state.ys[1:], Y[None].to(state.ys)])
        ms = torch.cat([state.mask[1:], mask[None].to(state.mask)])
        held = (ms.amax(-1) > 0).sum()  # the filled slots (an empty slot's loss is 0)
        theta, now = state.mean, state
        for _ in range(self.steps):
            theta, moments = self._step(full, likelihood, now, theta, xs, ys, ms, held)
            now = replace(now, **moments)
        return ReplayState(theta, xs, ys, ms, now.m1, now.m2, now.steps)
