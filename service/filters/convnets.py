"""Convolutional networks as pure functions h(theta, x) (``docs/algorithms.md`` 1.5).

A :class:`CNN` is a stack of layers over inputs of shape (C, H, W), given as flat rows of
C H W numbers (row-major, PyTorch's NCHW): ``conv`` (a 2-d convolution, then the activation),
``pool`` (max or average), then ``dense`` layers (flattened in C, H, W order; the activation
after each but the last, which has ``output_dim`` units).

Flat layout: PyTorch's, layer by layer: a convolution's weight (out, in, k, k) row-major then its
bias (out), a dense layer's weight (out, in) then bias (out). An ``nn.Sequential`` of the same
``nn.Conv2d`` / pooling / ``nn.Flatten`` / ``nn.Linear`` layers flattens to the same vector with
``torch.nn.utils.parameters_to_vector``, so a trained network can be the prior mean.

The Jacobian is ``torch.func``'s: reverse mode over the C outputs, vectorised over the rows
(``vmap(jacrev)``), (N, C, D); the tests check it against ``torch.autograd.functional.jacobian``
row by row, and the forward pass against ``torch.nn``.

``LENET5`` is LeNet-5 as the talk and the LoFi paper run it on 28 x 28 images: conv 6 (5 x 5,
padding 2), average pool 2, conv 16 (5 x 5), average pool 2, dense 120, 84, then C outputs, relu:
61,706 parameters for C = 10.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional

from service.errors import InvalidSpec
from service.filters.jacobians import DenseJacobian
from service.filters.networks import Activation, Init, _activate, check_init, layer_init

__all__ = ["CNN", "LENET5", "Conv", "Dense", "Layer", "Pool"]


@dataclass(frozen=True)
class Conv:
    channels: int
    kernel: int
    padding: int = 0
    stride: int = 1


@dataclass(frozen=True)
class Pool:
    kind: Literal["max", "avg"] = "max"
    size: int = 2


@dataclass(frozen=True)
class Dense:
    units: int


Layer = Conv | Pool | Dense

#: LeNet-5's hidden layers (the output layer, C units, comes after).
LENET5: tuple[Layer, ...] = (
    Conv(6, 5, padding=2),
    Pool("avg", 2),
    Conv(16, 5),
    Pool("avg", 2),
    Dense(120),
    Dense(84),
)


@dataclass(frozen=True)
class _Plan:
    """One parametrised layer's place in theta: its kind, weight shape and offsets."""

    layer: Conv | Dense
    weight: tuple[int, ...]
    w_at: int
    b_at: int
    end: int


@dataclass(frozen=True)
class CNN:
    """``layers`` over inputs of ``input_shape`` (C, H, W), then a dense output layer of
    ``output_dim`` units (module docstring)."""

    input_shape: tuple[int, int, int]
    layers: tuple[Layer, ...] = LENET5
    output_dim: int = 10
    activation: Activation = "relu"
    init: Init = "uniform"  # the default prior mean's (``networks.layer_init``)

    def __post_init__(self) -> None:
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise InvalidSpec(f"network input_shape must be [C, H, W], got {self.input_shape}")
        check_init(self.init)
        self._plan()  # raises InvalidSpec for a stack whose shapes do not work out

    @functools.cached_property
    def _plans(self) -> list[_Plan]:
        return self._plan()

    def _plan(self) -> list[_Plan]:
        """Each parametrised layer's place in theta."""
        c, h, w = self.input_shape
        flat: int | None = None
        plans: list[_Plan] = []
        at = 0
        for k, layer in enumerate((*self.layers, Dense(self.output_dim))):
            if isinstance(layer, Conv | Pool) and flat is not None:
                raise InvalidSpec(
                    f"network layer {k}: a {type(layer).__name__.lower()} after a dense layer"
                )
            if isinstance(layer, Pool):
                h, w = h // layer.size, w // layer.size
            elif isinstance(layer, Conv):
                h = (h + 2 * layer.padding - layer.kernel) // layer.stride + 1
                w = (w + 2 * layer.padding - layer.kernel) // layer.stride + 1
                shape: tuple[int, ...] = (layer.channels, c, layer.kernel, layer.kernel)
                c = layer.channels
            else:
                fan_in = flat if flat is not None else c * h * w
                shape, flat = (layer.units, fan_in), layer.units
            if h < 1 or w < 1:
                raise InvalidSpec(
                    f"network layer {k} leaves no pixels of the {self.input_shape} input"
                )
            if isinstance(layer, Conv | Dense):
                n = math.prod(shape)
                plans.append(_Plan(layer, shape, at, at + n, at + n + shape[0]))
                at += n + shape[0]
        return plans

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    @property
    def num_params(self) -> int:
        return self._plans[-1].end

    @property
    def linear_in_params(self) -> bool:
        return False

    @property
    def output_bias(self) -> slice | None:
        return slice(self.num_params - self.output_dim, self.num_params)

    @property
    def output_layer(self) -> slice:
        """The output layer's weights and bias in theta."""
        last = self._plans[-1]
        return slice(last.w_at, last.end)

    def _forward(self, theta: Tensor, x: Tensor) -> Tensor:
        """g (N, C) for one theta (D,) and rows x (N, I)."""
        plans = iter(self._plans)
        a = x.reshape(x.shape[0], *self.input_shape)
        n_layers = len(self.layers) + 1
        for k, layer in enumerate((*self.layers, Dense(self.output_dim))):
            if isinstance(layer, Pool):
                pool = functional.max_pool2d if layer.kind == "max" else functional.avg_pool2d
                a = pool(a, layer.size)
                continue
            p = next(plans)
            W = theta[p.w_at : p.b_at].view(p.weight)
            b = theta[p.b_at : p.end]
            if isinstance(layer, Conv):
                a = functional.conv2d(a, W, b, stride=layer.stride, padding=layer.padding)
            else:
                a = functional.linear(a.flatten(1), W, b)
            if k < n_layers - 1:
                a = _activate(self.activation, a)
        return a

    def apply(self, theta: Tensor, x: Tensor) -> Tensor:
        """(N, C) for theta (D,); (S, N, C) for S stacked draws (S, D), one draw at a time."""
        if theta.ndim == 1:
            return self._forward(theta, x)
        return torch.stack([self._forward(t, x) for t in theta])

    def jacobian(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(g (N, C), J (N, C, D)): reverse mode over the outputs, vectorised over the rows."""
        from torch.func import jacrev, vmap

        def row(t: Tensor, xi: Tensor) -> tuple[Tensor, Tensor]:
            out = self._forward(t, xi.unsqueeze(0))[0]
            return out, out

        J, g = vmap(jacrev(row, has_aux=True), in_dims=(None, 0))(theta, x)
        return g, J

    def jacobian_operator(self, theta: Tensor, x: Tensor) -> tuple[Tensor, DenseJacobian]:
        g, J = self.jacobian(theta, x)
        return g, DenseJacobian(J)

    @property
    def jacobian_numbers(self) -> int:
        return self.output_dim * self.num_params

    def init_mean(self, generator: torch.Generator) -> Tensor:
        """An initialisation of each layer (``init``, ``networks.layer_init``), fan_in = in k k
        for a convolution: PyTorch's default ``nn.Conv2d`` / ``nn.Linear`` one (``uniform``) or
        flax's ``lecun_normal`` with zero biases (``lecun``)."""
        parts: list[Tensor] = []
        for p in self._plans:
            weights = math.prod(p.weight)
            fan_in = math.prod(p.weight[1:])
            parts.append(
                layer_init(self.init, fan_in, weights, p.end - p.w_at - weights, generator)
            )
        return torch.cat(parts)
