"""The network's Jacobian as an operator: J diag(u) J^T, J V^T and blocks of J, without forming
the (N, C, D) array where a network's structure allows (``docs/algorithms.md`` 4.1.1, 4.1.2).

:class:`DenseJacobian` holds the array (the fallback for any network); :class:`LayerJacobian`
holds a dense stack's per-layer factors, the layer inputs a_{l-1} (N, in_l) and G_l = dg/dz_l
(N, C, out_l), and contracts them with :func:`layer_gram` and :func:`layer_jvp`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["DenseJacobian", "Jacobian", "LayerJacobian", "layer_gram", "layer_jvp"]


@runtime_checkable
class Jacobian(Protocol):
    """J = dg/dtheta (N, C, D) of N rows at one theta, as an operator.

    What the projections of ``docs/algorithms.md`` 4.1 need of J, without the (N, C, D) array where
    the network has structure: J diag(u) J^T, and J applied to a few directions.
    """

    @property
    def shape(self) -> tuple[int, int, int]:
        """(N, C, D)."""
        ...

    def gram(self, u: Tensor) -> Tensor:
        """J_n diag(u) J_n^T for each row: (N, C, C), for weights u (D,)."""
        ...

    def jvp(self, V: Tensor) -> Tensor:
        """J_n v_j for each row n and direction v_j (the rows of V (k, D)): (N, k, C), i.e. the
        row's V J_n^T (k, C)."""
        ...

    def dense(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` of J as an array (rows, C, D); a caller that needs the array sizes
        its blocks of rows."""
        ...


@dataclass(frozen=True)
class DenseJacobian:
    """A Jacobian held as its array J (N, C, D): the fallback for networks without structure."""

    J: Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        N, C, D = self.J.shape
        return N, C, D

    def gram(self, u: Tensor) -> Tensor:
        return (self.J * u) @ self.J.mT

    def jvp(self, V: Tensor) -> Tensor:
        return (self.J @ V.mT).mT

    def dense(self, start: int = 0, stop: int | None = None) -> Tensor:
        return self.J[start:stop]


def layer_gram(G: Tensor | None, a: Tensor, U: Tensor, v: Tensor | None) -> Tensor:
    """One dense layer's share of J diag(u) J^T (``docs/algorithms.md`` 4.1), (N, C, C).

    Row n's block of J for the layer is ``G_n ⊗ a_n`` over the weights and ``G_n`` over the bias
    (section 1.3). With u split as U (out, in) over the weights and v (out,) over the bias::

        sum_{o,i} G[c,o] a[i] U[o,i] a[i] G[c',o]  +  sum_o G[c,o] v[o] G[c',o]  =  (G diag(s) G^T)[c,c']
        s = (a ⊙ a) U^T + v                                                        (N, out)

    G (N, C, out) = dg/dz of the layer, or ``None`` for the output layer (G = I_C, and the share is
    diag(s)); a (N, in) the layer's input; v ``None`` for a layer without bias.
    """
    s = (a * a) @ U.mT
    if v is not None:
        s = s + v
    if G is None:
        return torch.diag_embed(s)
    return (G * s.unsqueeze(-2)) @ G.mT


def layer_jvp(G: Tensor | None, a: Tensor, V: Tensor, Vb: Tensor | None) -> Tensor:
    """One dense layer's share of J_n v_j for k directions (``docs/algorithms.md`` 4.1), (N, k, C).

    With the layer's part of direction j as V[j] (out, in) over the weights and Vb[j] (out,) over
    the bias::

        T[n,j,o]       = sum_i V[j,o,i] a[n,i] + Vb[j,o]      (N, k, out): k matmuls, one per direction
        (J_n v_j)_c    = sum_o G[n,c,o] T[n,j,o]               (N, k, C)

    G (N, C, out) or ``None`` (the output layer, G = I_C: the share is T); a (N, in); V (k, out, in),
    which may be a strided view (no copy is made); Vb (k, out) or ``None`` for a layer without bias.
    """
    T = torch.matmul(a, V.mT)  # (k, N, out)
    if Vb is not None:
        T = T + Vb.unsqueeze(-2)
    T = T.transpose(0, 1)  # (N, k, out)
    return T if G is None else T @ G.mT


@dataclass(frozen=True)
class LayerJacobian:
    """The Jacobian of a dense stack (``Linear``, ``MLP``) held as its per-layer factors.

    For layer l: ``inputs[l]`` = a_{l-1} (N, in_l) and ``grads[l]`` = G_l = dg/dz_l (N, C, out_l),
    ``None`` for the output layer (G = I_C). Row n's block of J over layer l's weights is
    G_l[n] ⊗ a_{l-1}[n] and over its bias G_l[n] (``docs/algorithms.md`` 1.3), so J itself,
    C D numbers a row, is never needed: ``gram`` and ``jvp`` sum :func:`layer_gram` and
    :func:`layer_jvp` over the layers at the cost of a few forward passes.
    """

    layers: tuple[tuple[int, int, int, int], ...]  # (fan_in, fan_out, weight at, bias at)
    inputs: tuple[Tensor, ...]
    grads: tuple[Tensor | None, ...]
    bias: bool
    output_dim: int
    num_params: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.inputs[0].shape[0], self.output_dim, self.num_params

    def gram(self, u: Tensor) -> Tensor:
        total: Tensor | None = None
        for (fan_in, fan_out, w_at, b_at), a, G in zip(
            self.layers, self.inputs, self.grads, strict=True
        ):
            U = u[w_at:b_at].view(fan_out, fan_in)
            v = u[b_at : b_at + fan_out] if self.bias else None
            part = layer_gram(G, a, U, v)
            total = part if total is None else total + part
        assert total is not None
        return total

    def jvp(self, V: Tensor) -> Tensor:
        total: Tensor | None = None
        k = V.shape[0]
        for (fan_in, fan_out, w_at, b_at), a, G in zip(
            self.layers, self.inputs, self.grads, strict=True
        ):
            Vw = V[:, w_at:b_at].reshape(k, fan_out, fan_in)
            Vb = V[:, b_at : b_at + fan_out] if self.bias else None
            part = layer_jvp(G, a, Vw, Vb)
            total = part if total is None else total + part
        assert total is not None
        return total

    def dense(self, start: int = 0, stop: int | None = None) -> Tensor:
        """J[n, :, layer l's weights] = G_l[n] ⊗ a_{l-1}[n] and J[n, :, its bias] = G_l[n]."""
        rows = slice(start, stop)
        a0 = self.inputs[0][rows]
        N, C = a0.shape[0], self.output_dim
        if C == 1 and len(self.layers) == 1 and self.grads[0] is None:  # a linear model: [x, 1]
            ones = (a0.new_ones((N, 1)),) if self.bias else ()
            return torch.cat((a0, *ones), 1).unsqueeze(1)
        J = a0.new_empty((N, C, self.num_params))
        eye = torch.eye(C, dtype=a0.dtype, device=a0.device).expand(N, C, C)
        for (fan_in, fan_out, w_at, b_at), a_all, G_all in zip(
            self.layers, self.inputs, self.grads, strict=True
        ):
            a = a_all[rows]
            Gl = eye if G_all is None else G_all[rows]
            J[:, :, w_at:b_at].view(N, C, fan_out, fan_in).copy_(
                Gl.unsqueeze(-1) * a.unsqueeze(1).unsqueeze(1)
            )
            if self.bias:
                J[:, :, b_at : b_at + fan_out] = Gl
        return J
