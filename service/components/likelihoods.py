"""The likelihood kinds: ``gaussian``, ``bernoulli``, ``categorical``, ``poisson``.

Each kind's ``score`` turns a step's pre-update predictions into what the calibration window
keeps (:class:`~service.calibration.Observation`): the NLL of the label, and either the class
probabilities (classes) or the predictive CDF at the label (PIT bounds; equal for continuous
outputs). Math in :mod:`service.filters.likelihoods`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator

from service.calibration import Observation
from service.components.registry import Label, LikelihoodKind, Registry, TypedSpec
from service.filters import (
    Bernoulli,
    Categorical,
    Gaussian,
    Likelihood,
    Poisson,
    RowReport,
    StepInfo,
)
from service.filters.likelihoods import ITERATIONS, MAX_ITERATIONS
from service.validation import Integer

__all__ = ["LIKELIHOODS", "BernoulliSpec", "CategoricalSpec", "GaussianSpec", "PoissonSpec"]

LIKELIHOODS: Registry[LikelihoodKind[Any]] = Registry("likelihood")


class GaussianSpec(TypedSpec):
    type: Literal["gaussian"]
    noise_variance: float | list[float] = 1.0

    @field_validator("noise_variance")
    @classmethod
    def _positive(cls, v: float | list[float]) -> float | list[float]:
        for r in v if isinstance(v, list) else [v]:
            if not (math.isfinite(r) and r > 0):
                raise ValueError(f"noise_variance must be finite and > 0, got {r}")
        return v


#: Damped Newton steps of a non-gaussian update towards the row's posterior mode
#: (``docs/algorithms.md`` 2.5); 0 is the moment-matched EKF update, linearised once.
Iterations = Annotated[Integer, Field(ITERATIONS, ge=0, le=MAX_ITERATIONS)]


class BernoulliSpec(TypedSpec):
    type: Literal["bernoulli"]
    iterations: Iterations = ITERATIONS


class CategoricalSpec(TypedSpec):
    type: Literal["categorical"]
    iterations: Iterations = ITERATIONS


class PoissonSpec(TypedSpec):
    type: Literal["poisson"]
    iterations: Iterations = ITERATIONS


def _score_classes(
    lik: Likelihood, infos: list[StepInfo], rows: list[RowReport], y: Sequence[Label]
) -> list[Observation]:
    return [
        Observation(nll=-r.log_likelihood, probs=r.mean, label=int(label))  # type: ignore[arg-type]
        for r, label in zip(rows, y, strict=True)
    ]


def _score_gaussian(
    lik: Likelihood, infos: list[StepInfo], rows: list[RowReport], y: Sequence[Label]
) -> list[Observation]:
    """In plain floats: a handful of torch ops per row costs more than the arithmetic."""
    out = []
    for r, label in zip(rows, y, strict=True):
        var = [a + b for a, b in zip(r.epistemic, r.aleatoric, strict=True)]
        ys = label if isinstance(label, list) else [label]
        z = [(v - m) / math.sqrt(s2) for v, m, s2 in zip(ys, r.mean, var, strict=True)]
        pit = [(u, u) for u in (0.5 * math.erfc(-zi / math.sqrt(2.0)) for zi in z)]
        out.append(Observation(nll=-r.log_likelihood, pit=pit, z=z))
    return out


def _score_counts(
    lik: Likelihood, infos: list[StepInfo], rows: list[RowReport], y: Sequence[Label]
) -> list[Observation]:
    """Non-randomised PIT bounds (F(y - 1), F(y)) of the count predictive."""
    if not infos:
        return []
    eta = torch.cat([i.eta for i in infos if i.eta is not None])
    var_eta = torch.cat([i.var_eta for i in infos if i.var_eta is not None])
    Y = lik.encode(torch.tensor(y, dtype=eta.dtype), 1).to(device=eta.device)
    bounds = lik.pit(Y, eta, var_eta)
    if bounds is None:
        raise TypeError(f"the {lik.name} likelihood has no predictive CDF")
    lo, hi = bounds[0].tolist(), bounds[1].tolist()
    return [
        Observation(nll=-r.log_likelihood, pit=list(zip(a, b, strict=True)))
        for r, a, b in zip(rows, lo, hi, strict=True)
    ]


def _gaussian(spec: GaussianSpec) -> Gaussian:
    nv = spec.noise_variance
    return Gaussian(tuple(nv) if isinstance(nv, list) else nv)


LIKELIHOODS.register(LikelihoodKind(GaussianSpec, _gaussian, _score_gaussian))


def _bernoulli(spec: BernoulliSpec) -> Bernoulli:
    return Bernoulli(iterations=spec.iterations)


def _categorical(spec: CategoricalSpec) -> Categorical:
    return Categorical(iterations=spec.iterations)


def _poisson(spec: PoissonSpec) -> Poisson:
    return Poisson(iterations=spec.iterations)


LIKELIHOODS.register(LikelihoodKind(BernoulliSpec, _bernoulli, _score_classes, classes=True))
LIKELIHOODS.register(LikelihoodKind(CategoricalSpec, _categorical, _score_classes, classes=True))
LIKELIHOODS.register(LikelihoodKind(PoissonSpec, _poisson, _score_counts))
