"""The projected filter kinds: ``subspace``, ``pulse``, ``last_layer`` (math in
:mod:`service.filters.subspace` and :mod:`service.filters.warmup`, ``docs/algorithms.md`` 3.9).

Each is the full-covariance EKF over phi = [z, w] of the network theta_0 + A^T z + S w; the kind's
``reshape`` builds that network from the spec when the model is built (so a restart rebuilds the
same one: a random A from the model's seed, a warm-up's A and theta_0 from its SGD, float64 on the
CPU). The state is N(phi) (P + P^2 numbers), a GaussState, the snapshots hold nothing else.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, StrictFloat, field_validator, model_validator
from torch import Tensor

from service.components.algorithms import ALGORITHMS, dense_numbers
from service.components.registry import AlgorithmKind, TypedSpec
from service.errors import InvalidInput, InvalidSpec
from service.filters import EKF, GaussState, Likelihood, Network
from service.filters.outputs import check_outputs
from service.filters.subspace import Projected, last_layer, principal_basis, random_basis
from service.filters.warmup import sgd_trajectory
from service.validation import Integer, Strict, finite_field

__all__ = ["LastLayerSpec", "PulseSpec", "SubspaceSpec", "WarmupSpec"]

Number = StrictFloat
#: The most numbers a basis A (d, D) may hold: 1 GiB in float64.
MAX_BASIS_NUMBERS = 1 << 27


class WarmupSpec(Strict):
    """The warm-up set and its SGD (``service.filters.warmup``): rows ``x``, labels ``y`` as in
    ``/update`` (with ``outputs``: one number a row, observing that output alone)."""

    x: list[list[Number]] = Field(min_length=2, max_length=20_000)
    y: list[Number | list[Number]] = Field(min_length=2, max_length=20_000)
    outputs: list[Annotated[Integer, Field(ge=0)]] | None = None
    epochs: Integer = Field(1000, ge=1, le=20_000)
    learning_rate: float = Field(0.1, gt=0, le=1e3)
    momentum: float = Field(0.9, ge=0, lt=1)
    iterates: Integer = Field(500, ge=2, le=5_000)

    _check_finite = field_validator("x", "y")(finite_field)

    @model_validator(mode="after")
    def _bounded(self) -> WarmupSpec:
        if len(self.x) * self.epochs > 50_000_000:
            raise ValueError(
                f"warmup: {len(self.x)} rows x {self.epochs} epochs is over the 5e7 row-steps a "
                "model's creation may spend; use fewer rows or epochs"
            )
        return self


class _Projection(TypedSpec):
    projection: Literal["random", "warmup"] = "random"
    warmup: WarmupSpec | None = None

    @model_validator(mode="after")
    def _warmup_given(self) -> _Projection:
        if self.projection == "warmup" and self.warmup is None:
            raise ValueError('projection "warmup" needs a warmup set (filter.warmup)')
        return self


class _Dimensioned(_Projection):
    dim: Integer = Field(ge=1, le=5_000)


class SubspaceSpec(_Dimensioned):
    type: Literal["subspace"]


class PulseSpec(_Dimensioned):
    type: Literal["pulse"]


class LastLayerSpec(TypedSpec):
    type: Literal["last_layer"]
    warmup: WarmupSpec | None = None


def _warm(
    w: WarmupSpec, network: Network, likelihood: Likelihood, theta0: Tensor
) -> tuple[Tensor, Tensor]:
    """The warm-up's (end point, iterates), its set checked against the model (InvalidSpec
    naming filter.warmup)."""
    x = torch.tensor(w.x, dtype=torch.float64)
    if x.shape[1:] != (network.input_dim,) or len(w.y) != x.shape[0]:
        raise InvalidSpec(
            f"filter.warmup: x must be {x.shape[0]} rows of {network.input_dim} numbers and y "
            f"one label a row; got x {tuple(x.shape)} and {len(w.y)} labels"
        )
    try:
        if w.outputs is not None:
            check_outputs(w.outputs, x.shape[0], network.output_dim)
            one = likelihood.restrict(0)
            Y = one.encode(torch.tensor(w.y, dtype=torch.float64), 1)
        else:
            Y = likelihood.encode(torch.tensor(w.y, dtype=torch.float64), network.output_dim)
    except (InvalidInput, ValueError, TypeError) as exc:
        raise InvalidSpec(f"filter.warmup: {exc}") from exc
    return sgd_trajectory(
        network,
        likelihood,
        theta0,
        x,
        Y,
        w.outputs,
        epochs=w.epochs,
        learning_rate=w.learning_rate,
        momentum=w.momentum,
        keep=min(w.iterates, w.epochs),
    )


def _project(
    spec: SubspaceSpec | PulseSpec,
    network: Network,
    likelihood: Likelihood,
    theta0: Tensor,
    seed: int,
    body: slice,
    free: slice,
) -> Projected:
    width = body.stop - body.start
    if spec.dim > width:
        raise InvalidSpec(
            f"filter.dim {spec.dim} is more than the {width} parameters it projects; use a "
            "smaller dim"
        )
    D = network.num_params
    if spec.dim * D > MAX_BASIS_NUMBERS:
        raise InvalidSpec(
            f"filter.dim {spec.dim} over {D} parameters is a basis of {spec.dim * D:,} numbers, "
            f"over the {MAX_BASIS_NUMBERS:,} a model may hold; use a smaller dim"
        )
    if spec.warmup is None:
        return Projected(network, theta0, random_basis(spec.dim, body, D, seed), free)
    end, iterates = _warm(spec.warmup, network, likelihood, theta0)
    if spec.projection == "random":
        return Projected(network, end, random_basis(spec.dim, body, D, seed), free)
    return Projected(network, end, principal_basis(iterates, spec.dim, body), free)


def _subspace(
    spec: SubspaceSpec, network: Network, likelihood: Likelihood, theta0: Tensor, seed: int
) -> Network:
    D = network.num_params
    return _project(spec, network, likelihood, theta0, seed, slice(0, D), slice(D, D))


def _pulse(
    spec: PulseSpec, network: Network, likelihood: Likelihood, theta0: Tensor, seed: int
) -> Network:
    free = last_layer(network)
    if free.start == 0:
        raise InvalidSpec(
            "pulse projects the hidden layers, and this network has none; use last_layer or "
            "subspace"
        )
    return _project(spec, network, likelihood, theta0, seed, slice(0, free.start), free)


def _last_layer(
    spec: LastLayerSpec, network: Network, likelihood: Likelihood, theta0: Tensor, seed: int
) -> Network:
    if spec.warmup is not None:
        theta0 = _warm(spec.warmup, network, likelihood, theta0)[0]
    empty = torch.zeros(0, network.num_params, dtype=torch.float64)
    return Projected(network, theta0, empty, last_layer(network))


ALGORITHMS.register(
    AlgorithmKind(
        SubspaceSpec,
        lambda s, n: EKF(name="subspace"),
        GaussState,
        dense_numbers,
        _subspace,
        {"dim": 2},
    )
)
ALGORITHMS.register(
    AlgorithmKind(
        PulseSpec, lambda s, n: EKF(name="pulse"), GaussState, dense_numbers, _pulse, {"dim": 2}
    )
)
ALGORITHMS.register(
    AlgorithmKind(
        LastLayerSpec, lambda s, n: EKF(name="last_layer"), GaussState, dense_numbers, _last_layer
    )
)
