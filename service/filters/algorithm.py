"""What an approximation must provide: the :class:`Algorithm` protocol over its state type.

An algorithm (``docs/algorithms.md`` section 3) decides how a Gaussian belief over the flat
parameters theta (D,) is represented, propagated by the dynamics and conditioned on one
linearised observation. Its state is a frozen dataclass of tensors (a :class:`Belief`); every
method is pure and returns new states.

============  ==================  =========================================================
method        shapes              meaning
============  ==================  =========================================================
init          m (D,) -> S         the prior N(m, diag(sigma_0^2)); sigma_0^2 a float or (D,)
predict       S -> S              theta_t = gamma theta_{t-1} + N(0, q I)
project       J (N, C, D)         J Sigma J^T, (N, C, C); J a networks.Jacobian operator
condition_on  lin, y (C,)         (posterior, J Sigma J^T of the prior belief (C, C), checks)
validity      S                   deferred checks: finite and positive definite
sample        n                   n exact draws theta ~ N(m, Sigma), (n, D)
covariance    S -> (D, D)         dense Sigma, for tests and small D
============  ==================  =========================================================
"""

from __future__ import annotations

from dataclasses import Field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import torch
from torch import Tensor

from service.filters.base import Linearization
from service.filters.linalg import Check

if TYPE_CHECKING:
    from service.filters.likelihoods import Likelihood
    from service.filters.networks import Jacobian, Network

__all__ = ["Algorithm", "Belief", "S", "state_tensors"]


class Belief(Protocol):
    """A belief state: a frozen dataclass of tensors with (at least) the mean m (D,)."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @property
    def mean(self) -> Tensor: ...


S = TypeVar("S", bound=Belief)


def state_tensors(state: Belief) -> dict[str, Tensor]:
    """A state's tensors by field name, in field order. A field left ``None`` (an optional part
    of a state, e.g. a plain-SGD state's Adam moments) holds none: it is neither stored in a
    snapshot nor an input of a compiled kernel. Optional fields come last, so a state is rebuilt
    from these by position."""
    fields = state.__dataclass_fields__
    return {k: t for k in fields if (t := getattr(state, k)) is not None}


class Algorithm(Protocol[S]):
    """The approximation: how a Gaussian belief is represented, propagated and conditioned."""

    @property
    def name(self) -> str: ...

    def check_model(self, network: Network, likelihood: Likelihood) -> None:
        """Raise InvalidSpec when this approximation cannot serve that network and likelihood."""
        ...

    def init(self, mean: Tensor, variance: float | Tensor) -> S:
        """The prior N(m, diag(sigma_0^2)): one variance for all, or one per parameter (D,)."""
        ...

    def predict(self, state: S, decay: float, process_noise: float) -> S: ...

    def project(self, state: S, J: Jacobian) -> Tensor:
        """J Sigma J^T (N, C, C) for the Jacobian J (N, C, D) of N rows, given as an operator
        (``networks.Jacobian``: ``gram``, ``jvp``, ``dense``; ``docs/algorithms.md`` 4.1)."""
        ...

    def condition_on(
        self, state: S, lin: Linearization, y: Tensor
    ) -> tuple[S, Tensor, tuple[Check, ...]]:
        """(posterior, J Sigma J^T of the prior belief, the step's deferred checks) for one row.

        A failure it can see at once raises StepRejected; the checks it defers (to settle with
        the rest of the request's in one host sync) come back in the third element."""
        ...

    def validity(self, state: S) -> tuple[Check, ...]:
        """Deferred checks that ``state`` is a finite, positive-definite belief."""
        ...

    def sample(self, state: S, n: int, generator: torch.Generator | None) -> Tensor:
        """n exact draws theta ~ N(m, Sigma), (n, D)."""
        ...

    def covariance(self, state: S) -> Tensor:
        """Dense Sigma (D, D): for tests and small D."""
        ...

    def state_bytes(self, state: S) -> int: ...
