"""The network kinds: ``linear``, ``mlp`` (math in :mod:`service.filters.networks`) and ``cnn``
(:mod:`service.filters.convnets`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from service.components.registry import NetworkKind, Registry, TypedSpec
from service.filters import MLP, Linear
from service.filters.convnets import CNN, LENET5, Conv, Dense, Layer, Pool
from service.validation import Integer, Strict

__all__ = ["NETWORKS", "CNNSpec", "LinearSpec", "MLPSpec"]

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

    @model_validator(mode="after")
    def _one_stack(self) -> CNNSpec:
        if (self.preset is None) == (self.layers is None):
            raise ValueError('a cnn takes either "preset" ("lenet5") or "layers", not both')
        return self


def _layer(spec: ConvLayer | PoolLayer | DenseLayer) -> Layer:
    if isinstance(spec, ConvLayer):
        return Conv(spec.channels, spec.kernel, spec.padding, spec.stride)
    if isinstance(spec, PoolLayer):
        return Pool(spec.kind, spec.size)
    return Dense(spec.units)


def _cnn(spec: CNNSpec) -> CNN:
    layers = LENET5 if spec.layers is None else tuple(_layer(s) for s in spec.layers)
    c, h, w = spec.input_shape
    return CNN((c, h, w), layers, spec.output_dim, spec.activation)


def _linear(spec: LinearSpec) -> Linear:
    return Linear(spec.input_dim, spec.output_dim, spec.bias)


def _mlp(spec: MLPSpec) -> MLP:
    return MLP(spec.input_dim, tuple(spec.hidden), spec.output_dim, spec.activation)


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
