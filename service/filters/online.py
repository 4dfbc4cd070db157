"""One online filter: a network, a likelihood, an algorithm, the dynamics and the prior.

The state-space model (``docs/algorithms.md`` section 0)::

    theta_t = gamma theta_{t-1} + w_t,   w_t ~ N(0, q I),       theta_0 ~ N(mu_0, sigma_0^2 I)
    y_t | theta_t ~ moment-matched N(mu(g(theta_t, x_t)), R)

One observation is one ``step``: ``predict`` (the dynamics) then ``update`` (linearise at the
predicted mean, report the pre-update predictive and log density of y, condition; a point
estimate takes a gradient step instead, ``service.filters.gradient``). ``predictive`` and
``sample`` read the belief they are given: pass ``predict(state)`` for p(theta_{t+1} | D_{1:t}).
Everything is pure: a step that fails (non-finite or non-PSD) raises StepRejected, its input intact.

>>> import torch
>>> from service.filters import Gaussian, Kalman, Linear
>>> f = OnlineFilter(Linear(input_dim=1, bias=False), Gaussian(noise_variance=1.0), Kalman())
>>> state = f.init(dtype=torch.float64)
>>> state, info = f.step(state, torch.tensor([1.0]), torch.tensor([2.0]))
>>> round(float(state.mean[0]), 6), round(float(info.predictive.variance[0, 0]), 6)
(1.0, 2.0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, cast

import torch
from torch import Tensor

from service.errors import InvalidInput, InvalidSpec, StepRejected
from service.filters import draws
from service.filters.algorithm import Algorithm, S
from service.filters.base import Linearization, Predictive, StepInfo
from service.filters.block import applies, run_block
from service.filters.ekf import GaussState
from service.filters.gradient import learned
from service.filters.iterated import row_linearization, updated_prediction_check
from service.filters.likelihoods import Likelihood
from service.filters.linalg import Check, all_finite, finite_check, input_check, not_finite, settle
from service.filters.lofi import LoFi
from service.filters.networks import Network
from service.filters.outputs import check_outputs, partial_targets, restricted
from service.filters.priors import prior_variance
from service.filters.statespace import StateSpace, check_state_space, propagate

__all__ = ["Dynamics", "OnlineFilter", "Prior", "RowStep"]

#: Rows per chunk in ``predictive``: the network's Jacobian operator (``jacobian_numbers`` a row;
#: C D for a dense J) stays under about 2**24 numbers, and a chunk holds at most ``_CHUNK_ROWS``
#: rows, which keeps a structured chunk's factors near the cache (``docs/algorithms.md`` 4.1).
_CHUNK_NUMBERS = 1 << 24
_CHUNK_ROWS = 512


#: A compiled row step (``service.filters.compiled.RowKernel``): the new state and the row's
#: report from (state before the dynamics, x (1, I), encoded y (C,)), or None when the eager step
#: must compute the row.
RowStep = Callable[[S, Tensor, Tensor], "tuple[S, StepInfo] | None"]


@dataclass(frozen=True)
class Dynamics:
    """theta_t = decay * theta_{t-1} + N(0, process_noise I).

    ``steady_state=True`` sets process_noise = (1 - decay^2) * prior variance, which makes the prior
    the stationary law of the dynamics (rebayes ``steady_state_constraint``).
    """

    decay: float = 1.0
    process_noise: float = 0.0
    steady_state: bool = False

    def __post_init__(self) -> None:
        if not (0.0 < self.decay <= 1.0):
            raise InvalidSpec(f"dynamics decay must be in (0, 1], got {self.decay!r}")
        if not (self.process_noise >= 0.0 and self.process_noise < float("inf")):
            raise InvalidSpec(
                f"dynamics process_noise must be finite and >= 0, got {self.process_noise!r}"
            )


@dataclass(frozen=True)
class Prior:
    """theta_0 ~ N(mean, diag(sigma_0^2)): ``variance`` for every parameter but the output bias,
    whose variance is ``bias_variance``, by default the likelihood's ``prior_bias_scale`` (16 for
    poisson, else 1) times ``variance`` (``docs/algorithms.md`` 1.4). ``mean=None`` takes the
    network's default (see networks)."""

    variance: float = 1.0
    mean: Tensor | None = None
    seed: int = 0
    bias_variance: float | None = None

    def __post_init__(self) -> None:
        for what, v in (("variance", self.variance), ("bias_variance", self.bias_variance)):
            if v is not None and not (v > 0.0 and v < float("inf")):
                raise InvalidSpec(f"prior {what} must be finite and > 0, got {v!r}")


@dataclass(frozen=True)
class OnlineFilter(Generic[S]):
    """Binds network, likelihood, algorithm, dynamics and prior; every method is pure.

    Generic over the algorithm's belief type ``S`` (``LoFiState``, ``GaussState``, ...): every
    state it takes and returns is one of those.
    """

    network: Network
    likelihood: Likelihood
    algorithm: Algorithm[S]
    dynamics: Dynamics = field(default_factory=Dynamics)
    prior: Prior = field(default_factory=Prior)

    def __post_init__(self) -> None:
        self.likelihood.check_output_dim(self.network.output_dim)
        self.algorithm.check_model(self.network, self.likelihood)
        if isinstance(self.network, StateSpace):
            check_state_space(self.algorithm.name, self.likelihood, self.dynamics == Dynamics())
        if isinstance(self.algorithm, LoFi) and self.algorithm.orthogonal and self.process_noise:
            raise InvalidSpec(
                "lofi with orthogonal=True needs dynamics without process noise (process noise "
                "makes the rows of W non-orthogonal)"
            )
        mean = self.prior.mean
        if mean is not None:
            if mean.shape != (self.network.num_params,):
                raise InvalidSpec(
                    f"prior mean must have shape ({self.network.num_params},) (the flat parameter "
                    f"vector), got {tuple(mean.shape)}"
                )
            if not bool(torch.isfinite(mean).all()):
                raise InvalidSpec("prior mean holds NaN or infinite values")

    @property
    def process_noise(self) -> float:
        """q, resolved for ``steady_state``."""
        if self.dynamics.steady_state:
            return (1.0 - self.dynamics.decay**2) * self.prior.variance
        return self.dynamics.process_noise

    @property
    def num_params(self) -> int:
        return self.network.num_params

    # -- belief ------------------------------------------------------------------------------

    def init(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> S:
        """The prior belief N(mu_0, diag(sigma_0^2)) on ``dtype`` / ``device``."""
        if self.prior.mean is not None:
            mean = self.prior.mean
        else:
            gen = torch.Generator().manual_seed(self.prior.seed)
            mean = self.network.init_mean(gen)
        variance = prior_variance(self.prior, self.network, self.likelihood)
        return self.algorithm.init(mean.to(dtype=dtype, device=device), variance)

    def predict(self, state: S, x: Tensor | None = None) -> S:
        """p(theta_t | D_{1:t-1}) from p(theta_{t-1} | D_{1:t-1}); for a state-space network the
        transition over the time step of the row x (1, 1) (one unit when None)."""
        if isinstance(self.network, StateSpace):
            A, Q = self.network.at(None if x is None else x[0, 0], state.mean)
            return cast(S, propagate(cast(GaussState, state), A, Q))
        return self.algorithm.predict(state, self.dynamics.decay, self.process_noise)

    def update(self, state: S, x: Tensor, y: Tensor) -> tuple[S, StepInfo]:
        """Condition the (already predicted) belief on one row: x (I,), y encoded (C,)."""
        theta = state.mean
        x = self._shaped(x.unsqueeze(0) if x.ndim == 1 else x, theta)
        y = y.to(dtype=theta.dtype, device=theta.device).reshape(-1)
        new, info, checks = self._update(state, x, y)
        settle([input_check("x", x), *checks])
        return new, info

    def _update(self, state: S, x: Tensor, y: Tensor) -> tuple[S, StepInfo, list[Check]]:
        """``update`` on a validated row x (1, I) and target y (C,) of the state's dtype, with
        the step's checks not yet settled (the caller settles them, see ``run``)."""
        if hasattr(self.algorithm, "learn"):  # a learner (sgd, replay_sgd, ivon)
            return learned(self, state, x, y)
        eta, J = self.network.jacobian(state.mean, x)
        lin = row_linearization(self, state, eta[0], J, y)
        new, JSJ, checks = self.algorithm.condition_on(state, lin, y)
        var_eta = JSJ.unsqueeze(0)
        pred = self.likelihood.predictive(eta, var_eta)
        loglik = self.likelihood.log_predictive(y.unsqueeze(0), eta, var_eta)[0]
        return (
            new,
            StepInfo(pred, loglik, eta, var_eta),
            [
                *checks,
                *self.algorithm.validity(new),
                finite_check("the pre-update prediction", pred.mean, pred.variance, loglik),
                *self._updated_checks(lin, new, x),
            ],
        )

    def _updated_checks(self, lin: Linearization, new: S, x: Tensor) -> list[Check]:
        """The updated model's prediction of the row x (1, I) is finite (``docs/algorithms.md``
        6.4): in full through a link, its mean (the network's output) through the identity;
        nothing for a gaussian linear model, whose prediction of the row lies between the
        prior's and y, with a smaller variance."""
        if lin.V is not None:
            return [updated_prediction_check(self, new, x)]
        if self.network.linear_in_params:
            return []
        eta = self.network.apply(new.mean, x)
        return [finite_check("the updated model's prediction of the row", eta)]

    def step(self, state: S, x: Tensor, y: Tensor) -> tuple[S, StepInfo]:
        """predict, then update on one row."""
        return self.update(self.predict(state, x.reshape(1, -1)), x, y)

    def run(
        self,
        state: S,
        x: Tensor,
        y: Tensor,
        kernel: RowStep[S] | Sequence[RowStep[S]] | None = None,
        outputs: Sequence[int] | None = None,
    ) -> tuple[S, list[StepInfo]]:
        """``step`` over the rows of x (N, I) with raw targets y (see ``encode``), in order.

        The exact Kalman filter with one output and static dynamics takes the rows in blocks
        (:mod:`service.filters.block`, ``docs/algorithms.md`` 3.7): the same posterior and
        per-row reports, to rounding, for a fraction of the row-by-row loop's time. Otherwise,
        ``kernel`` (a compiled step, ``service.filters.compiled``) computes each row in place of
        the eager step where it can: a row it answers ``None`` for is computed eagerly.

        ``outputs`` (N ints): row i observes output ``outputs[i]`` alone, y one number per row
        (``restrict``, ``docs/algorithms.md`` 3.8); each row's report is of that output, (1, 1);
        ``kernel`` is then one step per output k, ``restrict(k)``'s (or None: eager steps).
        """
        theta = state.mean
        x = self._shaped(x, theta)
        filters: list[OnlineFilter[S]] | None = None  # each row's, observing its output alone
        if outputs is not None and self.network.output_dim > 1:
            Y, filters = partial_targets(self, x, y, outputs)
        else:
            if outputs is not None:  # one output: observing it is observing all
                check_outputs(outputs, x.shape[0], 1)
            outputs, Y = None, self.encode(y)
            if Y.shape[0] != x.shape[0]:
                raise InvalidInput(f"x has {x.shape[0]} rows but y has {Y.shape[0]}")
        Y = Y.to(dtype=theta.dtype, device=theta.device)
        if applies(self, x.shape[0], partial=filters is not None):
            new, infos, checks = run_block(self, state, x, Y, outputs)
            settle([input_check("x", x), *checks])  # one host sync for the whole request
            return new, infos
        if filters is None:
            steps = None if kernel is None or isinstance(kernel, Sequence) else [kernel] * len(x)
        elif isinstance(kernel, Sequence) and outputs is not None:  # each row's output's step
            steps = [kernel[k] for k in outputs]
        else:
            steps = None
        return self._run_rows(state, x, Y, steps, filters)

    def restrict(self, k: int) -> OnlineFilter[S]:
        """The filter of output k observed alone (``service.filters.outputs.restricted``)."""
        return restricted(self, k)

    def _run_rows(
        self,
        state: S,
        x: Tensor,
        Y: Tensor,
        steps: Sequence[RowStep[S]] | None = None,
        filters: Sequence[OnlineFilter[S]] | None = None,
    ) -> tuple[S, list[StepInfo]]:
        """``run`` row by row, on validated rows x (N, I) and encoded targets Y (N, C) of the
        state's dtype (finiteness of x settled with the steps' checks); row i by
        ``filters[i]`` where given, by its compiled step ``steps[i]`` (that filter's) where it can."""
        infos: list[StepInfo] = []
        # x's finiteness is settled with the steps' own checks, and is one of a kernel's: while
        # every row passes its kernel's checks, nothing is left to settle (no host sync)
        pending: list[Check] = []
        for i in range(x.shape[0]):
            f = self if filters is None else filters[i]
            done = None if steps is None else steps[i](state, x[i : i + 1], Y[i])
            if done is not None:  # its checks passed
                state, info = done
                infos.append(info)
                continue
            if not pending:
                pending.append(input_check("x", x))
            try:
                state, info, checks = f._update(f.predict(state, x[i : i + 1]), x[i : i + 1], Y[i])
            except StepRejected:
                settle(pending)  # an earlier row's failure is the one to report
                raise
            infos.append(info)
            pending += checks
        settle(pending)  # one host sync for the whole request
        return state, infos

    def linearized(self, state: S, x: Tensor) -> Predictive:
        """The linearised predictive of checked rows x (N, I) in one pass: eta = g(m, x) and
        J Sigma J^T (the algorithm's projection of the network's Jacobian) through the
        likelihood's moments (``docs/algorithms.md`` 4.1)."""
        eta, J = self.network.jacobian_operator(state.mean, x)
        return self.likelihood.predictive(eta, self.algorithm.project(state, J))

    def encode(self, y: Tensor) -> Tensor:
        """Validated sufficient statistics (N, C) of raw targets (class indices become one-hot)."""
        return self.likelihood.encode(y, self.network.output_dim)

    # -- queries ------------------------------------------------------------------------------

    def predictive(
        self,
        state: S,
        x: Tensor,
        *,
        method: Literal["linearized", "mc"] = "linearized",
        num_samples: int = 1000,
        generator: torch.Generator | None = None,
    ) -> Predictive:
        """Predictive moments for rows x (N, I): linearised (probit for classes) or Monte Carlo."""
        theta = state.mean
        x = self._rows(x, theta)
        if method == "mc":
            eta = self.network.apply(self.sample(state, num_samples, generator), x)  # (S, N, C)
            means = self.likelihood.mean(eta)
            return Predictive(
                mean=means.mean(0),
                epistemic=means.var(0, correction=0),
                aleatoric=self.likelihood.variance_diag(eta).mean(0),
            )
        if method != "linearized":
            raise InvalidInput(f"unknown predictive method {method!r}; use 'linearized' or 'mc'")
        rows = self._chunk_rows()
        parts = [self.linearized(state, x[at : at + rows]) for at in range(0, x.shape[0], rows)]
        if len(parts) == 1:
            return parts[0]
        return Predictive(
            mean=torch.cat([p.mean for p in parts]),
            epistemic=torch.cat([p.epistemic for p in parts]),
            aleatoric=torch.cat([p.aleatoric for p in parts]),
        )

    def predictive_mean(self, state: S, x: Tensor) -> Tensor:
        """The mean of ``predictive(state, x)`` alone, (N, C) (``docs/algorithms.md`` 4.1.3).

        Where the likelihood's predictive mean does not depend on Var[eta] (the gaussian: the mean
        is eta), it is mu(g(m, x)): one forward pass. Otherwise (probit, log-normal means) it needs
        diag(J Sigma J^T), and the whole linearised predictive is computed.
        """
        if self.likelihood.mean_needs_variance:
            return self.predictive(state, x).mean
        theta = state.mean
        x = self._rows(x, theta)
        rows = self._chunk_rows()
        eta = [self.network.apply(theta, x[s : s + rows]) for s in range(0, x.shape[0], rows)]
        return self.likelihood.mean(torch.cat(eta))

    def sample(self, state: S, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact draws of theta from the belief, (n, D)."""
        return self.algorithm.sample(state, n, generator)

    def sample_outputs(
        self,
        state: S,
        x: Tensor,
        n: int,
        generator: torch.Generator | None = None,
        *,
        linearized: bool = False,
    ) -> Tensor:
        """Thompson samples mu(eta_k) (n, N, C) of the rows x (N, I): eta_k = g(theta_k, x) with
        draw k sharing one theta_k across all rows, or, ``linearized``, a draw of the
        linearised predictive N(g(m, x), J Sigma J^T) (``service.filters.draws``)."""
        return draws.sample_outputs(
            self, state, self._rows(x, state.mean), n, generator, linearized
        )

    def sample_outputs_each(
        self,
        state: S,
        x: Tensor,
        n: int,
        generator: torch.Generator | None = None,
        *,
        linearized: bool = False,
    ) -> Tensor:
        """``sample_outputs`` of each of G groups of rows x (G, N, I), in one go: (G, n, N, C),
        group g's draws independent of the other groups' (``service.filters.draws``)."""
        if x.ndim != 3:
            raise InvalidInput(f"x must have shape (groups, rows, inputs), got {tuple(x.shape)}")
        G, N, I = x.shape
        flat = self._rows(x.reshape(G * N, I), state.mean)
        return draws.sample_outputs_each(
            self, state, flat.reshape(G, N, I), n, generator, linearized
        )

    def state_bytes(self, state: S) -> int:
        return self.algorithm.state_bytes(state)

    # -- helpers ------------------------------------------------------------------------------

    def _chunk_rows(self) -> int:
        """Rows per chunk of the predictive (``docs/algorithms.md`` 4.1)."""
        return max(1, min(_CHUNK_ROWS, _CHUNK_NUMBERS // self.network.jacobian_numbers))

    def _rows(self, x: Tensor, like: Tensor) -> Tensor:
        """Rows x (N, I) checked (shape and finiteness) and on ``like``'s dtype and device."""
        x = self._shaped(x, like)
        if not all_finite(x):
            raise InvalidInput(not_finite("x", x.dtype))
        return x

    def _shaped(self, x: Tensor, like: Tensor) -> Tensor:
        """``_rows`` but for finiteness, which the caller checks (updates: with the step's own
        checks, one host sync for both)."""
        if x.ndim != 2 or x.shape[1] != self.network.input_dim:
            raise InvalidInput(
                f"x must have shape (rows, {self.network.input_dim}), got {tuple(x.shape)}"
            )
        return x.to(dtype=like.dtype, device=like.device)
