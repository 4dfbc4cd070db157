"""Networks as pure functions h(theta, x) of a flat parameter vector.

Symbols (``docs/algorithms.md`` section 1):

=========  =============  ===============================================================
symbol     shape          meaning
=========  =============  ===============================================================
theta      (D,) / (S, D)  flat parameters; S stacked draws are evaluated at once by ``apply``
x          (N, I)         N input rows
g          (N, C)         network output: regression mean, logits, or log-rates
J          (N, C, D)      dg/dtheta at theta, one C x D block per row
=========  =============  ===============================================================

Flat layout (what ``prior.mean`` and snapshots use): PyTorch's ``nn.Linear`` layout, layer by layer,
weight (out x in, row-major) then bias (out). A network built with ``torch.nn.Sequential`` of
``nn.Linear`` layers flattens to the same vector with
``torch.cat([p.reshape(-1) for p in seq.parameters()])``.

Jacobians are closed-form backward passes through the layers, batched over rows (about 20x cheaper
than ``torch.func.jacrev`` on a small MLP). :func:`jacobian_autodiff` is the ``torch.func`` route,
kept for networks without a closed form and as the independent check in the tests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args, runtime_checkable

import torch
from torch import Tensor

from service.errors import InvalidSpec
from service.filters.jacobians import (
    DenseJacobian,
    Jacobian,
    LayerJacobian,
    layer_gram,
    layer_jvp,
)

__all__ = [
    "MLP",
    "Activation",
    "DenseJacobian",
    "Jacobian",
    "LayerJacobian",
    "Linear",
    "Network",
    "dense_operator",
    "jacobian_autodiff",
    "layer_gram",
    "layer_jvp",
]

Activation = Literal["relu", "tanh", "gelu", "elu"]
_ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "gelu", "elu")


@runtime_checkable
class Network(Protocol):
    """What a filter needs of a network."""

    @property
    def input_dim(self) -> int: ...

    @property
    def output_dim(self) -> int: ...

    @property
    def num_params(self) -> int: ...

    @property
    def linear_in_params(self) -> bool:
        """Whether g(theta, x) is linear in theta (then the linearised predictive is exact and
        Thompson draws of the outputs need no draw of theta)."""
        ...

    @property
    def output_bias(self) -> slice | None:
        """Where the output layer's bias (C entries) sits in theta; None without one."""
        ...

    def apply(self, theta: Tensor, x: Tensor) -> Tensor:
        """g = h(theta, x): (N, C) for theta (D,), (S, N, C) for theta (S, D)."""
        ...

    def jacobian(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(g, J): g (N, C) and J = dg/dtheta (N, C, D), both at theta (D,)."""
        ...

    def jacobian_operator(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Jacobian]:
        """(g, J) with J as an operator (:class:`Jacobian`) that need not hold the (N, C, D)
        array. A network without structure to exploit returns
        ``g, DenseJacobian(J)`` from ``jacobian`` (see :func:`dense_operator`)."""
        ...

    @property
    def jacobian_numbers(self) -> int:
        """Numbers per row that ``jacobian_operator``'s J holds (C D for a dense J): what
        ``OnlineFilter.predictive`` sizes its chunks of rows by."""
        ...

    def init_mean(self, generator: torch.Generator) -> Tensor:
        """A default prior mean (D,) in float64 on the CPU."""
        ...


def _layers(sizes: Sequence[int], bias: bool) -> list[tuple[int, int, int, int]]:
    """(fan_in, fan_out, weight offset, bias offset) for each layer of a dense stack."""
    out: list[tuple[int, int, int, int]] = []
    offset = 0
    for fan_in, fan_out in itertools.pairwise(sizes):
        w_at = offset
        offset += fan_in * fan_out
        b_at = offset
        if bias:
            offset += fan_out
        out.append((fan_in, fan_out, w_at, b_at))
    return out


def _unflatten(
    theta: Tensor, layer: tuple[int, int, int, int], bias: bool
) -> tuple[Tensor, Tensor | None]:
    fan_in, fan_out, w_at, b_at = layer
    W = theta[..., w_at : w_at + fan_in * fan_out].reshape(*theta.shape[:-1], fan_out, fan_in)
    b = theta[..., b_at : b_at + fan_out] if bias else None
    return W, b


def _dense(a: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    """a @ W^T + b, broadcasting a stack of draws W (S, out, in) against rows a (N, in)."""
    z = a @ W.mT
    return z if b is None else z + b.unsqueeze(-2)


# -- the Jacobian as an operator (docs/algorithms.md 4.1) ----------------------------------------


def dense_operator(network: Network, theta: Tensor, x: Tensor) -> tuple[Tensor, Jacobian]:
    """``jacobian_operator`` for a network with no structure to exploit: (g, DenseJacobian(J))."""
    g, J = network.jacobian(theta, x)
    return g, DenseJacobian(J)


#: A network's default prior mean (``docs/algorithms.md`` 1.4): ``uniform``, PyTorch's default
#: init; ``lecun``, flax's (the authors' JAX code's) default.
Init = Literal["uniform", "lecun"]
INITS: tuple[Init, ...] = get_args(Init)
#: The sd of a standard normal truncated to [-2, 2] (jax.nn.initializers.truncated_normal's).
_TRUNCATED_SD = 0.87962566103423978


def layer_init(
    kind: Init, fan_in: int, weights: int, biases: int, generator: torch.Generator
) -> Tensor:
    """One layer's initial parameters, its ``weights`` then its ``biases``, in float64:

    - ``uniform`` (PyTorch's ``nn.Linear`` / ``nn.Conv2d``): weight and bias ~ U(-b, b),
      b = 1/sqrt(fan_in);
    - ``lecun`` (flax's ``Dense`` / ``Conv``, ``lecun_normal``): weight ~ N(0, 1/fan_in)
      truncated to two standard deviations (and rescaled to keep that variance), bias 0.
    """
    check_init(kind)
    if kind == "uniform":
        bound = 1.0 / math.sqrt(fan_in)
        u = torch.rand(weights + biases, generator=generator, dtype=torch.float64)
        return (u * 2 - 1) * bound
    # lecun: the normal truncated to [-2, 2] by inverting its CDF between the bounds, as jax does
    edge = math.erf(2.0 / math.sqrt(2.0))
    u = torch.rand(weights, generator=generator, dtype=torch.float64) * (2 * edge) - edge
    z = math.sqrt(2.0) * torch.special.erfinv(u)
    w = z / (_TRUNCATED_SD * math.sqrt(fan_in))
    return torch.cat([w, torch.zeros(biases, dtype=torch.float64)])


def check_init(kind: object) -> None:
    """InvalidSpec unless ``kind`` is one of ``INITS``."""
    if kind not in INITS:
        raise InvalidSpec(f"network init must be one of {list(INITS)}, got {kind!r}")


def _dense_init(sizes: Sequence[int], kind: Init, generator: torch.Generator) -> Tensor:
    """A dense stack's initial parameters (with biases), layer by layer (``layer_init``)."""
    parts = [
        layer_init(kind, fan_in, fan_in * fan_out, fan_out, generator)
        for fan_in, fan_out, _, _ in _layers(sizes, True)
    ]
    return torch.cat(parts)


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if not isinstance(value, int) or value < 1:
            raise InvalidSpec(f"network {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Linear:
    """g = W x + b with W (C, I) and b (C,) (no b when ``bias=False``).

    >>> net = Linear(input_dim=2, output_dim=1)
    >>> theta = torch.tensor([1.0, -2.0, 0.5])      # W = [[1, -2]], b = [0.5]
    >>> net.apply(theta, torch.tensor([[3.0, 1.0]]))
    tensor([[1.5000]])
    """

    input_dim: int
    output_dim: int = 1
    bias: bool = True

    def __post_init__(self) -> None:
        _check_dims(input_dim=self.input_dim, output_dim=self.output_dim)

    @property
    def num_params(self) -> int:
        return self.output_dim * self.input_dim + (self.output_dim if self.bias else 0)

    @property
    def linear_in_params(self) -> bool:
        return True

    @property
    def output_bias(self) -> slice | None:
        return slice(self.output_dim * self.input_dim, self.num_params) if self.bias else None

    def apply(self, theta: Tensor, x: Tensor) -> Tensor:
        (layer,) = _layers((self.input_dim, self.output_dim), self.bias)
        W, b = _unflatten(theta, layer, self.bias)
        return _dense(x, W, b)

    def jacobian(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """The operator's dense J: [x, 1] for one output, I_C ⊗ [x, 1] for C."""
        g, J = self.jacobian_operator(theta, x)
        return g, J.dense()

    def jacobian_operator(self, theta: Tensor, x: Tensor) -> tuple[Tensor, LayerJacobian]:
        """One layer whose G is I_C: row n's J is I_C ⊗ x_n (and I_C over the bias)."""
        layers = tuple(_layers((self.input_dim, self.output_dim), self.bias))
        J = LayerJacobian(layers, (x,), (None,), self.bias, self.output_dim, self.num_params)
        return self.apply(theta, x), J

    @property
    def jacobian_numbers(self) -> int:
        return self.input_dim

    def init_mean(self, generator: torch.Generator) -> Tensor:
        return torch.zeros(self.num_params, dtype=torch.float64)


def _activation(name: str, z: Tensor) -> tuple[Tensor, Tensor]:
    """(act(z), act'(z))."""
    if name == "relu":
        return z.clamp_min(0), (z > 0).to(z.dtype)
    if name == "tanh":
        a = torch.tanh(z)
        return a, 1 - a * a
    if name == "gelu":  # exact (erf) GELU, as torch.nn.functional.gelu's default
        cdf = 0.5 * (1 + torch.special.erf(z / math.sqrt(2)))
        pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        return z * cdf, cdf + z * pdf
    if name == "elu":  # alpha = 1
        e = torch.expm1(z.clamp_max(0))
        return torch.where(z > 0, z, e), torch.where(z > 0, torch.ones_like(z), e + 1)
    raise InvalidSpec(f"unknown activation {name!r}; expected one of {', '.join(_ACTIVATIONS)}")


def _activate(name: str, z: Tensor) -> Tensor:
    """act(z) alone, for ``apply`` (which needs no slope: for S draws x N rows, computing it
    took a third of the time)."""
    if name == "relu":
        return z.clamp_min(0)
    if name == "tanh":
        return torch.tanh(z)
    return _activation(name, z)[0]


@dataclass(frozen=True)
class MLP:
    """A dense stack ``input_dim -> hidden... -> output_dim``; ``activation`` after each hidden layer.

    The default prior mean is a draw from an initialisation of the network (``init``: PyTorch's
    default ``nn.Linear`` one, or flax's ``lecun``): at theta = 0 every hidden unit is dead and
    the Jacobian of the output layer vanishes, so a zero mean would never learn (rebayes likewise
    centres the prior on an initialisation of the network).

    >>> net = MLP(input_dim=3, hidden=(4,), output_dim=2, activation="tanh")
    >>> net.num_params                     # 4*3 + 4 + 2*4 + 2
    26
    """

    input_dim: int
    hidden: tuple[int, ...]
    output_dim: int = 1
    activation: Activation = "relu"
    init: Init = "uniform"  # the default prior mean's (``layer_init``)

    def __post_init__(self) -> None:
        _check_dims(input_dim=self.input_dim, output_dim=self.output_dim)
        for h in self.hidden:
            _check_dims(hidden=h)
        check_init(self.init)
        if self.activation not in _ACTIVATIONS:
            raise InvalidSpec(
                f"unknown activation {self.activation!r}; expected one of {', '.join(_ACTIVATIONS)}"
            )

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.input_dim, *self.hidden, self.output_dim)

    @property
    def num_params(self) -> int:
        return sum(i * o + o for i, o in zip(self.sizes[:-1], self.sizes[1:], strict=True))

    @property
    def linear_in_params(self) -> bool:
        return False

    @property
    def output_bias(self) -> slice | None:
        return slice(self.num_params - self.output_dim, self.num_params)

    def apply(self, theta: Tensor, x: Tensor) -> Tensor:
        layers = _layers(self.sizes, True)
        a = x
        for k, layer in enumerate(layers):
            W, b = _unflatten(theta, layer, True)
            a = _dense(a, W, b)
            if k < len(layers) - 1:
                a = _activate(self.activation, a)
        return a

    def jacobian(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        g, J = self.jacobian_operator(theta, x)
        return g, J.dense()

    def jacobian_operator(self, theta: Tensor, x: Tensor) -> tuple[Tensor, LayerJacobian]:
        """The forward pass, keeping each layer's input, then G_l = dg/dz_l backwards (section
        1.3): G_{L+1} = I_C (held as ``None``), G_{l-1} = (G_l W_l) ⊙ act'(z_{l-1})."""
        layers = tuple(_layers(self.sizes, True))
        params = [_unflatten(theta, layer, True) for layer in layers]
        inputs: list[Tensor] = []  # a_{l-1} for each layer l
        slopes: list[Tensor] = []  # act'(z_l) for each hidden layer l
        a = x
        for k, (W, b) in enumerate(params):
            inputs.append(a)
            a = _dense(a, W, b)
            if k < len(params) - 1:
                a, slope = _activation(self.activation, a)
                slopes.append(slope)
        grads: list[Tensor | None] = [None] * len(layers)
        G: Tensor | None = None  # dg/dz_l (N, C, out_l); None for I_C
        for k in range(len(layers) - 1, 0, -1):
            grads[k] = G
            W = params[k][0]
            G = (W if G is None else G @ W) * slopes[k - 1].unsqueeze(1)
        grads[0] = G
        J = LayerJacobian(
            layers, tuple(inputs), tuple(grads), True, self.output_dim, self.num_params
        )
        return a, J

    @property
    def jacobian_numbers(self) -> int:
        return sum(self.sizes[:-1]) + self.output_dim * sum(self.hidden)

    def init_mean(self, generator: torch.Generator) -> Tensor:
        return _dense_init(self.sizes, self.init, generator)


def jacobian_autodiff(network: Network, theta: Tensor, x: Tensor) -> Tensor:
    """dg/dtheta (N, C, D) by ``torch.func.jacrev``: for networks with no closed form, and tests."""
    from torch.func import jacrev

    J: Tensor = jacrev(lambda t: network.apply(t, x))(theta)
    return J
