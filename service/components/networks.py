"""The network kinds: ``linear`` and ``mlp`` (math in :mod:`service.filters.networks`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from service.components.registry import NetworkKind, Registry, TypedSpec
from service.filters import MLP, Linear
from service.validation import Integer

__all__ = ["NETWORKS", "LinearSpec", "MLPSpec"]

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


def _linear(spec: LinearSpec) -> Linear:
    return Linear(spec.input_dim, spec.output_dim, spec.bias)


def _mlp(spec: MLPSpec) -> MLP:
    return MLP(spec.input_dim, tuple(spec.hidden), spec.output_dim, spec.activation)


NETWORKS.register(NetworkKind(LinearSpec, _linear, {"input_dim": 3}))
NETWORKS.register(NetworkKind(MLPSpec, _mlp, {"input_dim": 3, "hidden": [4], "activation": "tanh"}))
