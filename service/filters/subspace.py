"""Projected networks: the subspace EKF, PULSE and last-layer filters as a change of parameters
(``docs/algorithms.md`` 3.9).

Each is a full-covariance EKF over a small parameter phi (P,) of a network whose D parameters are
an affine function of phi::

    theta(phi) = theta_0 + A^T z + S w,        phi = [z, w]

=======  ==========  ================================================================
symbol   shape       meaning
=======  ==========  ================================================================
theta_0  (D,)        the offset: the prior mean, or the end point of a warm-up
A        (d, D)      the basis of the subspace, zero on the free coordinates
z        (d,)        the subspace coordinates
w        (F,)        the free coordinates (the output layer for PULSE and last-layer)
S        (F, D)      the selector that puts w on ``free``, a slice of theta
J_phi    (N, C, P)   [J A^T, J S^T] = dg/dphi for J = dg/dtheta (N, C, D)
=======  ==========  ================================================================

* subspace EKF (Duran-Martin, Kara & Murphy 2022): d directions over every parameter, F = 0;
* PULSE (the talk, section "PULSE"): d directions over the hidden layers, w the output layer;
* last layer (neural-linear): d = 0, w the output layer, the body fixed at theta_0.

phi's prior is N(0, sigma_0^2 I): with phi = 0 the network is theta_0. A random A has entries
N(0, 1/d) (drawn from the model's seed, never stored), so each theta_i has prior variance about
sigma_0^2 as in the full-space filters; a warm-up's A holds orthonormal principal directions of
an SGD trajectory (:mod:`service.filters.warmup`), along each of which z moves theta by
sigma_0 a standard deviation. The mapping is linear, so g is linear in phi wherever it is linear in
theta: on a linear network with a gaussian likelihood the filter is the Kalman filter in phi.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from service.errors import InvalidSpec
from service.filters.jacobians import DenseJacobian
from service.filters.networks import Network

__all__ = ["Projected", "last_layer", "principal_basis", "random_basis"]


def last_layer(network: Network) -> slice:
    """The output layer's weights and bias in theta: the network's ``output_layer`` where it
    has one (a CNN), else the last C (h + 1) entries of a dense stack whose last hidden layer
    has h units (every parameter of a linear network)."""
    layer: slice | None = getattr(network, "output_layer", None)
    if layer is not None:
        return layer
    hidden: tuple[int, ...] = getattr(network, "hidden", ())
    if not hidden:
        return slice(0, network.num_params)
    D, C = network.num_params, network.output_dim
    return slice(D - C * (hidden[-1] + 1), D)


def random_basis(dim: int, body: slice, num_params: int, seed: int) -> Tensor:
    """A (dim, D) float64 with N(0, 1/dim) entries on ``body`` and zeros elsewhere, the same
    for the same arguments on every machine (a CPU generator seeded by ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.zeros(dim, num_params, dtype=torch.float64)
    width = body.stop - body.start
    A[:, body] = torch.randn(dim, width, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    return A


def principal_basis(iterates: Tensor, dim: int, body: slice) -> Tensor:
    """The top ``dim`` principal directions (dim, D) of the iterates (K, D) restricted to
    ``body`` (centred, orthonormal rows, zeros off ``body``), as sklearn's ``PCA.components_``."""
    K = iterates.shape[0]
    if dim > K - 1:
        raise InvalidSpec(
            f"filter.dim {dim} needs at least {dim + 1} warm-up iterates to find that many "
            f"directions; the warm-up keeps {K}: raise filter.warmup.epochs or lower filter.dim"
        )
    part = iterates[:, body]
    centred = part - part.mean(0)
    _, _, Vh = torch.linalg.svd(centred, full_matrices=False)
    A = torch.zeros(dim, iterates.shape[1], dtype=torch.float64)
    A[:, body] = Vh[:dim]
    return A


@dataclass(frozen=True, eq=False)
class Projected:
    """The network theta_0 + A^T z + S w of ``base`` (module docstring): its parameters phi are
    [z (d,), w (F,)] with d = ``basis.shape[0]`` and w on ``free``.

    ``offset`` (D,) and ``basis`` (d, D) are float64 masters; each dtype and device gets its copy
    once. The repr names a digest of both, so a compiled step's key tells two bases apart.
    """

    base: Network
    offset: Tensor
    basis: Tensor
    free: slice
    _copies: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = field(
        default_factory=dict, repr=False
    )

    def __post_init__(self) -> None:
        D = self.base.num_params
        if self.offset.shape != (D,) or self.basis.ndim != 2 or self.basis.shape[1] != D:
            raise InvalidSpec(f"a projection needs an offset ({D},) and a basis (d, {D})")

    def __repr__(self) -> str:
        digest = hashlib.sha256()
        for t in (self.offset, self.basis):
            digest.update(t.contiguous().numpy().tobytes())
        return (
            f"Projected(base={self.base!r}, dim={self.dim}, free={self.free!r}, "
            f"tensors={digest.hexdigest()[:16]})"
        )

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @property
    def input_dim(self) -> int:
        return self.base.input_dim

    @property
    def output_dim(self) -> int:
        return self.base.output_dim

    @property
    def num_params(self) -> int:
        return self.dim + int(self.free.stop - self.free.start)

    @property
    def linear_in_params(self) -> bool:
        return self.base.linear_in_params

    @property
    def output_bias(self) -> slice | None:
        bias = self.base.output_bias
        if bias is None or not (self.free.start <= bias.start and bias.stop <= self.free.stop):
            return None
        at = self.dim + bias.start - self.free.start
        return slice(at, at + bias.stop - bias.start)

    def _on(self, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (like.dtype, like.device)
        copy = self._copies.get(key)
        if copy is None:
            copy = (self.offset.to(like), self.basis.to(like))
            self._copies[key] = copy
        return copy

    def theta(self, phi: Tensor) -> Tensor:
        """theta_0 + A^T z + S w for phi (P,) or (S, P): (D,) or (S, D)."""
        offset, A = self._on(phi)
        d = self.dim
        theta = offset + phi[..., :d] @ A
        if self.free.stop > self.free.start:
            D = offset.shape[0]
            theta = theta + torch.nn.functional.pad(
                phi[..., d:], (self.free.start, D - self.free.stop)
            )
        return theta

    def apply(self, theta: Tensor, x: Tensor) -> Tensor:
        return self.base.apply(self.theta(theta), x)

    def jacobian(self, theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        g, J = self.jacobian_operator(theta, x)
        return g, J.J

    def jacobian_operator(self, theta: Tensor, x: Tensor) -> tuple[Tensor, DenseJacobian]:
        """J_phi = [J A^T, J S^T]: the base's Jacobian operator applied to the d directions
        (``jvp``) and its free columns."""
        _, A = self._on(theta)
        g, Jb = self.base.jacobian_operator(self.theta(theta), x)
        parts = []
        if self.dim:
            parts.append(Jb.jvp(A).mT)  # (N, C, d)
        if self.free.stop > self.free.start:
            parts.append(Jb.dense()[..., self.free])
        J = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        return g, DenseJacobian(J)

    @property
    def jacobian_numbers(self) -> int:
        return self.output_dim * self.base.num_params

    def init_mean(self, generator: torch.Generator) -> Tensor:
        return torch.zeros(self.num_params, dtype=torch.float64)
