"""The filter kinds: ``lofi``, ``ekf``, ``diagonal``, ``kalman`` (math in :mod:`service.filters`).

Each kind's ``numbers(spec, D)`` is the count of numbers its state holds for D parameters:
LoFi m, Upsilon (D each) and W (d, D); EKF/Kalman m and P (D, D); diagonal m and p.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from service.components.registry import AlgorithmKind, Registry, TypedSpec
from service.filters import EKF, Diagonal, DiagState, GaussState, Kalman, LoFi, LoFiState
from service.validation import Integer

__all__ = ["ALGORITHMS", "DiagonalSpec", "EKFSpec", "KalmanSpec", "LoFiSpec"]

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


def _dense_numbers(spec: TypedSpec, D: int) -> int:
    return D * D + D


def _lofi_numbers(spec: LoFiSpec, D: int) -> int:
    return (spec.rank + 2) * D


ALGORITHMS.register(AlgorithmKind(LoFiSpec, lambda s: LoFi(rank=s.rank), LoFiState, _lofi_numbers))
ALGORITHMS.register(AlgorithmKind(EKFSpec, lambda s: EKF(), GaussState, _dense_numbers))
ALGORITHMS.register(
    AlgorithmKind(DiagonalSpec, lambda s: Diagonal(), DiagState, lambda s, D: 2 * D)
)
ALGORITHMS.register(AlgorithmKind(KalmanSpec, lambda s: Kalman(), GaussState, _dense_numbers))
