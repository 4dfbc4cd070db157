"""Partial observations: a row that observes one output of a multi-output model
(``docs/algorithms.md`` 3.8).

A model with C outputs g(theta, x) (C,) may be told, per row, that y observes output k alone
(``/update``'s ``outputs``; a bandit's reward for arm k when the arms are the outputs). The
other outputs are unobserved, so the row's observation model is the model's own, restricted to
output k::

    y | theta ~ moment-matched N(mu_k(g_k(theta, x)), R_kk),   H = V_kk J_k,   J_k = dg_k/dtheta (1, D)

with J_k row k of the full Jacobian (C, D). For a gaussian likelihood with a linear network this
is exact: the posterior is the joint Gaussian of (theta, y_1..y_C) conditioned on y_k alone. The
update is the one-output update of the same algorithm on the same belief, so every filter
supports it as it stands: :class:`OutputOf` is the network g_k, ``Likelihood.restrict(k)`` the
likelihood of output k (gaussian: noise variance r_k; a one-output family: itself; categorical,
whose one observation is of every class at once, refuses).

==========  ======  ====================================================================
symbol      shape   meaning
==========  ======  ====================================================================
theta       (D,)    the flat parameters, shared with the full network (same layout)
g_k         (N, 1)  output k of g(theta, x)
J_k         (N,1,D) dg_k/dtheta, row k of each row's (C, D) Jacobian
==========  ======  ====================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from service.errors import InvalidInput
from service.filters.algorithm import S
from service.filters.jacobians import DenseJacobian, Jacobian
from service.filters.networks import Network

if TYPE_CHECKING:
    from service.filters.online import OnlineFilter

__all__ = ["OutputOf", "check_outputs", "partial_targets", "restricted"]


def restricted(f: OnlineFilter[S], k: int) -> OnlineFilter[S]:
    """The filter of output k observed alone: the same belief layout, algorithm, dynamics and
    prior, with the network g_k and the likelihood of output k. A one-output filter is its own
    restriction."""
    if f.network.output_dim == 1:
        return f
    return replace(f, network=OutputOf(f.network, k), likelihood=f.likelihood.restrict(k))


def check_outputs(outputs: Sequence[int], rows: int, output_dim: int) -> None:
    """InvalidInput unless ``outputs`` holds one output index in [0, output_dim) per row."""
    if len(outputs) != rows:
        raise InvalidInput(f"outputs has {len(outputs)} entries but x has {rows} rows")
    for i, k in enumerate(outputs):
        if not 0 <= k < output_dim:
            raise InvalidInput(
                f"outputs[{i}] = {k} is not an output of this model (it has {output_dim}: "
                f"0 to {output_dim - 1})"
            )


def partial_targets(
    f: OnlineFilter[S], x: Tensor, y: Tensor, outputs: Sequence[int]
) -> tuple[Tensor, list[OnlineFilter[S]]]:
    """For rows x (N, I) whose row i observes output ``outputs[i]`` alone with the number y_i:
    the encoded targets (N, 1) and each row's restricted filter. InvalidInput (naming
    ``outputs`` or ``y``) where they do not fit the model; nothing is computed then."""
    N = x.shape[0]
    check_outputs(outputs, N, f.network.output_dim)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != N:
        raise InvalidInput(
            f"with outputs, y must hold one number per row ({N} rows), got shape {tuple(y.shape)}"
        )
    by_output = {k: restricted(f, k) for k in sorted(set(outputs))}
    Y = torch.empty((N, 1), dtype=y.dtype if y.is_floating_point() else torch.float64)
    for k, fk in by_output.items():
        rows = torch.tensor([i for i, o in enumerate(outputs) if o == k], dtype=torch.long)
        Y[rows] = fk.encode(y.cpu()[rows]).to(Y.dtype)
    return Y, [by_output[k] for k in outputs]


@dataclass(frozen=True)
class OutputOf:
    """Output ``k`` of ``network`` as a one-output network over the same parameters.

    >>> from service.filters.networks import Linear
    >>> net = OutputOf(Linear(input_dim=1, output_dim=2), 1)   # theta = [W_0, W_1, b_0, b_1]
    >>> net.apply(torch.tensor([1.0, 2.0, 0.5, -1.0]), torch.tensor([[3.0]]))
    tensor([[5.]])
    """

    network: Network
    k: int

    @property
    def input_dim(self) -> int:
        return self.network.input_dim

    @property
    def output_dim(self) -> int:
        return 1

    @property
    def num_params(self) -> int:
        return self.network.num_params

    @property
    def linear_in_params(self) -> bool:
        return self.network.linear_in_params

    @property
    def output_bias(self) -> slice | None:
        bias = self.network.output_bias
        return None if bias is None else slice(bias.start + self.k, bias.start + self.k + 1)

    def apply(self, theta: Tensor, x: Tensor) -> Tensor:
        return self.network.apply(theta, x)[..., self.k : self.k + 1]

    def jacobian(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        g, J = self.network.jacobian(theta, x)
        return g[:, self.k : self.k + 1], J[:, self.k : self.k + 1]

    def jacobian_operator(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Jacobian]:
        g, J = self.jacobian(theta, x)
        return g, DenseJacobian(J)

    @property
    def jacobian_numbers(self) -> int:
        return self.network.jacobian_numbers

    def init_mean(self, generator: torch.Generator) -> Tensor:
        return self.network.init_mean(generator)
