"""The network kinds: ``linear``, ``mlp`` (math in :mod:`service.filters.networks`), ``cnn``
(:mod:`service.filters.convnets`) and ``state_space`` (:mod:`service.filters.statespace`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from service.components.registry import NetworkKind, Registry, TypedSpec
from service.errors import InvalidSpec
from service.filters import MLP, Linear
from service.filters.convnets import CNN, LENET5, Conv, Dense, Layer, Pool
from service.filters.networks import Init
from service.filters.statespace import Fixed, Kinematic, Matrix, StateSpace, Transition
from service.validation import Integer, Strict

__all__ = ["NETWORKS", "CNNSpec", "LinearSpec", "MLPSpec", "StateSpaceSpec"]

NETWORKS: Registry[NetworkKind[Any]] = Registry("network")


class LinearSpec(TypedSpec):
    type: Literal["linear"]
    input_dim: Integer = Field(ge=1, le=1_000_000)
    output_dim: Integer = Field(1, ge=1, le=10_000)
    bias: bool = True


class MLPSpec(TypedSpec):
    type: Literal["mlp"]
    input_dim: Integer = Field(ge=1, le=1_000_000)
    hidden: list[Annotated[Integer, Field(ge=1, le=100_000)]] = Field(min_length=1, max_length=16)
    output_dim: Integer = Field(1, ge=1, le=10_000)
    activation: Literal["relu", "tanh", "gelu", "elu"] = "relu"
    init: Init = "uniform"


class ConvLayer(Strict):
    type: Literal["conv"]
    channels: Integer = Field(ge=1, le=4096)
    kernel: Integer = Field(ge=1, le=64)
    padding: Integer = Field(0, ge=0, le=64)
    stride: Integer = Field(1, ge=1, le=64)


class PoolLayer(Strict):
    type: Literal["pool"]
    kind: Literal["max", "avg"] = "max"
    size: Integer = Field(2, ge=1, le=64)


class DenseLayer(Strict):
    type: Literal["dense"]
    units: Integer = Field(ge=1, le=100_000)


LayerSpec = Annotated[Union[ConvLayer, PoolLayer, DenseLayer], Field(discriminator="type")]  # noqa: UP007


class CNNSpec(TypedSpec):
    """A convolutional network over rows of C H W numbers: ``preset`` (``lenet5``) or an explicit
    ``layers`` list, then a dense output layer of ``output_dim`` units."""

    type: Literal["cnn"]
    input_shape: list[Annotated[Integer, Field(ge=1, le=4096)]] = Field(min_length=3, max_length=3)
    preset: Literal["lenet5"] | None = None
    layers: list[LayerSpec] | None = Field(None, min_length=1, max_length=32)
    output_dim: Integer = Field(1, ge=1, le=10_000)
    activation: Literal["relu", "tanh", "gelu", "elu"] = "relu"
    init: Init = "uniform"

    @model_validator(mode="after")
    def _one_stack(self) -> CNNSpec:
        if (self.preset is None) == (self.layers is None):
            raise ValueError('a cnn takes either "preset" ("lenet5") or "layers", not both')
        return self


class KinematicSpec(Strict):
    """A kinematic transition over ``dims`` axes, parameterised by each row's time step."""

    type: Literal["constant_velocity", "constant_acceleration"]
    dims: Integer = Field(ge=1, le=1_000)


class WhiteNoiseSpec(Strict):
    """Continuous white noise of intensity ``q`` on a kinematic model's highest derivative."""

    type: Literal["white_acceleration"]
    q: float = Field(ge=0, allow_inf_nan=False)


Rows = list[list[Annotated[float, Field(allow_inf_nan=False)]]]


class StateSpaceSpec(TypedSpec):
    """A linear-Gaussian state-space model (``docs/algorithms.md`` 3.11): a latent state of
    ``state_dim`` numbers moved by ``transition`` (a matrix A, one step per unit of time, or a
    kinematic family of the time step) with ``process_covariance`` (a matrix Q; a number: q I
    for a matrix A, the white-noise intensity q for a kinematic family), seen through
    ``observation_matrix`` H (m rows: the model's outputs, whose noise is the gaussian
    likelihood's)."""

    type: Literal["state_space"]
    state_dim: Integer = Field(ge=1, le=1_000)
    observation_matrix: Rows = Field(min_length=1, max_length=1_000)
    transition: Rows | KinematicSpec
    process_covariance: Rows | Annotated[float, Field(ge=0, allow_inf_nan=False)] | WhiteNoiseSpec
    output_dim: Integer | None = Field(None, ge=1, description="the rows of H, when given")


def _matrix(rows: list[list[float]]) -> Matrix:
    return tuple(tuple(float(v) for v in row) for row in rows)


def _transition(spec: StateSpaceSpec) -> Transition:
    q = spec.process_covariance
    if isinstance(spec.transition, KinematicSpec):
        order = 1 if spec.transition.type == "constant_velocity" else 2
        if isinstance(q, list):
            return Kinematic(order, spec.transition.dims, q_matrix=_matrix(q))
        return Kinematic(order, spec.transition.dims, q if isinstance(q, float) else q.q)
    if isinstance(q, WhiteNoiseSpec):
        raise InvalidSpec("white_acceleration noise needs a kinematic transition")
    n = spec.state_dim
    Q = _matrix(q) if isinstance(q, list) else tuple(
        tuple(float(q) if i == j else 0.0 for j in range(n)) for i in range(n)
    )  # fmt: skip
    return Fixed(_matrix(spec.transition), Q)


def _state_space(spec: StateSpaceSpec) -> StateSpace:
    H = _matrix(spec.observation_matrix)
    if spec.output_dim is not None and spec.output_dim != len(H):
        raise InvalidSpec(
            f"output_dim is {spec.output_dim} but observation_matrix has {len(H)} rows"
        )
    return StateSpace(spec.state_dim, H, _transition(spec))


def _layer(spec: ConvLayer | PoolLayer | DenseLayer) -> Layer:
    if isinstance(spec, ConvLayer):
        return Conv(spec.channels, spec.kernel, spec.padding, spec.stride)
    if isinstance(spec, PoolLayer):
        return Pool(spec.kind, spec.size)
    return Dense(spec.units)


def _cnn(spec: CNNSpec) -> CNN:
    layers = LENET5 if spec.layers is None else tuple(_layer(s) for s in spec.layers)
    c, h, w = spec.input_shape
    return CNN((c, h, w), layers, spec.output_dim, spec.activation, spec.init)


def _linear(spec: LinearSpec) -> Linear:
    return Linear(spec.input_dim, spec.output_dim, spec.bias)


def _mlp(spec: MLPSpec) -> MLP:
    return MLP(spec.input_dim, tuple(spec.hidden), spec.output_dim, spec.activation, spec.init)


NETWORKS.register(NetworkKind(LinearSpec, _linear, {"input_dim": 3}))
NETWORKS.register(NetworkKind(MLPSpec, _mlp, {"input_dim": 3, "hidden": [4], "activation": "tanh"}))
NETWORKS.register(
    NetworkKind(
        CNNSpec,
        _cnn,
        {
            "input_shape": [1, 5, 5],
            "layers": [
                {"type": "conv", "channels": 2, "kernel": 3, "padding": 1},
                {"type": "pool", "kind": "max", "size": 2},
                {"type": "dense", "units": 3},
            ],
            "activation": "tanh",
        },
    )
)
NETWORKS.register(
    NetworkKind(
        StateSpaceSpec,
        _state_space,
        {
            "state_dim": 2,
            "observation_matrix": [[1.0, 0.0]],
            "transition": {"type": "constant_velocity", "dims": 1},
            "process_covariance": 0.5,
        },
    )
)
