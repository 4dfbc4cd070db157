"""The filter kinds: ``lofi``, ``ekf``, ``diagonal``, ``kalman``, the variational learner ``ivon``
and the point estimates ``sgd``, ``replay_sgd`` (math in :mod:`service.filters`; the projected kinds are in
:mod:`service.components.projected`).

Each kind's ``numbers(spec, network)`` is the count of numbers its state holds for the network's
D parameters: LoFi m, Upsilon (D each) and W (d, D); EKF/Kalman m and P (D, D); diagonal m and p.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from service.components.registry import AlgorithmKind, Registry, TypedSpec
from service.filters import (
    EKF,
    Diagonal,
    DiagState,
    GaussState,
    Kalman,
    LoFi,
    LoFiState,
    Network,
)
from service.filters.gradient import SGD, PointState, ReplaySGD, ReplayState
from service.filters.ivon import IVON, IVONState
from service.validation import Integer

__all__ = [
    "ALGORITHMS",
    "DiagonalSpec",
    "EKFSpec",
    "IVONSpec",
    "KalmanSpec",
    "LoFiSpec",
    "ReplaySGDSpec",
    "SGDSpec",
    "dense_numbers",
]

ALGORITHMS: Registry[AlgorithmKind[Any, Any]] = Registry("filter")


class LoFiSpec(TypedSpec):
    type: Literal["lofi"]
    rank: Integer = Field(10, ge=0, le=1000)


class EKFSpec(TypedSpec):
    type: Literal["ekf"]


class DiagonalSpec(TypedSpec):
    type: Literal["diagonal"]


class KalmanSpec(TypedSpec):
    type: Literal["kalman"]


class _OptimizerFields(TypedSpec):
    """How a point estimate steps: plain SGD, or Adam with its betas and epsilon."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0, le=1)


class SGDSpec(_OptimizerFields):
    """Online SGD (``service.filters.gradient``): a point estimate, no epistemic variance."""

    type: Literal["sgd"]
    learning_rate: float = Field(gt=0, le=1e3)


class ReplaySGDSpec(_OptimizerFields):
    """Replay-buffer SGD over the last ``buffer`` rows, ``steps`` gradient steps a row."""

    type: Literal["replay_sgd"]
    learning_rate: float = Field(gt=0, le=1e3)
    buffer: Integer = Field(10, ge=1, le=10_000)
    steps: Integer = Field(1, ge=1, le=1_000)


class IVONSpec(TypedSpec):
    """IVON (``service.filters.ivon``): a diagonal Gaussian moved by one natural-gradient step
    per row, its Hessian estimated from ``mc_samples`` weight perturbations; ``ess`` is the
    effective sample size lambda (the data the posterior stands for), the prior's variance
    sets the weight decay delta = 1 / (lambda sigma_0^2)."""

    type: Literal["ivon"]
    learning_rate: float = Field(0.01, gt=0, le=1e3)
    ess: float = Field(1000.0, gt=0, le=1e12)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99999, ge=0, lt=1)  # IVON's: h moves little in one pass
    mc_samples: Integer = Field(1, ge=1, le=1_000)
    seed: Integer = Field(0, ge=0, le=2**31 - 1)
    hess_init: float = Field(1.0, ge=0, le=1e6)


def _ivon(spec: IVONSpec, network: Network) -> IVON:
    return IVON(
        spec.learning_rate, spec.ess, spec.beta1, spec.beta2, spec.mc_samples, spec.seed,
        spec.hess_init,
    )  # fmt: skip


def dense_numbers(spec: TypedSpec, network: Network) -> int:
    D = network.num_params
    return D * D + D


def _lofi_numbers(spec: LoFiSpec, network: Network) -> int:
    return (spec.rank + 2) * network.num_params


ALGORITHMS.register(
    AlgorithmKind(LoFiSpec, lambda s, n: LoFi(rank=s.rank), LoFiState, _lofi_numbers)
)
ALGORITHMS.register(AlgorithmKind(EKFSpec, lambda s, n: EKF(), GaussState, dense_numbers))
ALGORITHMS.register(
    AlgorithmKind(DiagonalSpec, lambda s, n: Diagonal(), DiagState, lambda s, n: 2 * n.num_params)
)
ALGORITHMS.register(AlgorithmKind(KalmanSpec, lambda s, n: Kalman(), GaussState, dense_numbers))


def _sgd(spec: SGDSpec, network: Network) -> SGD:
    return SGD(
        spec.learning_rate, optimizer=spec.optimizer, beta1=spec.beta1, beta2=spec.beta2,
        eps=spec.eps,
    )  # fmt: skip


def _sgd_numbers(spec: SGDSpec | ReplaySGDSpec, network: Network) -> int:
    """theta, and Adam's two moments and its step count."""
    D = network.num_params
    return D + (2 * D + 1 if spec.optimizer == "adam" else 0)


def _replay(spec: ReplaySGDSpec, network: Network) -> ReplaySGD:
    return ReplaySGD(
        spec.learning_rate, spec.buffer, network.input_dim, network.output_dim, spec.steps,
        optimizer=spec.optimizer, beta1=spec.beta1, beta2=spec.beta2, eps=spec.eps,
    )  # fmt: skip


def _replay_numbers(spec: ReplaySGDSpec, network: Network) -> int:
    held = spec.buffer * (network.input_dim + 2 * network.output_dim)
    return _sgd_numbers(spec, network) + held


ALGORITHMS.register(
    AlgorithmKind(
        SGDSpec,
        _sgd,
        PointState,
        _sgd_numbers,
        example={"learning_rate": 0.05},
    )
)
ALGORITHMS.register(
    AlgorithmKind(
        ReplaySGDSpec, _replay, ReplayState, _replay_numbers, example={"learning_rate": 0.05}
    )
)
ALGORITHMS.register(
    AlgorithmKind(
        IVONSpec,
        _ivon,
        IVONState,
        lambda s, n: 4 * n.num_params + 1,
        example={"learning_rate": 0.1, "ess": 50.0, "mc_samples": 2},
    )
)
