"""Thompson draws of a model's outputs (``docs/algorithms.md`` 4.4).

For N rows x (N, I) with C outputs each, a draw is mu(eta) with eta (N, C) one of:

* **parameter draws**: eta = g(theta, x), theta ~ N(m, Sigma), one theta shared by all N rows;
* **linearised draws** (``linearized=True``): eta ~ N(g(m, x), J Sigma J^T), the law of the
  first-order expansion g(m, x) + J (theta - m) of the network about the mean (the linearised
  predictive the filters condition with; Immer et al. 2021). The N C outputs are drawn jointly:
  the rows' cross-covariances J_i Sigma J_j^T are kept, so a decision between rows or outputs
  sees how the posterior couples them.

For a network linear in theta the two are the same law, and both are drawn the second way when
N C <= D (an N C-dimensional draw instead of a D-dimensional one). For a non-linear network they
differ: a parameter draw pushes directions the posterior never learned through the
nonlinearity, which moves its outputs' mean and inflates their spread; the linearised draw's
mean is g(m, x) and its covariance the predictive's (the neural bandits of issue 14).

==========  ==============  =========================================================
symbol      shape           meaning
==========  ==============  =========================================================
x           (N, I)          rows; (G, N, I) for G independent groups (``..._each``)
g           (N, C)          g(m, x), the network at the belief's mean
J           (N, C, D)       dg/dtheta at m
Omega       (N C, N C)      J Sigma J^T of the stacked outputs (``Algorithm.project``)
z           (n, N C)        standard normal (drawn in float32: ``normals``);
                            eta = g + z Omega^{1/2} (symmetric root)
==========  ==============  =========================================================

Repeated rows of one call draw exactly alike (an arg-max tie then goes to the lowest index,
as for a shared theta). Where N C > D, linearised draws use n draws of theta pushed through the
linear map instead: the same law.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from service.filters.algorithm import S
from service.filters.jacobians import DenseJacobian
from service.filters.linalg import all_finite, psd_sqrt

if TYPE_CHECKING:
    from service.filters.online import OnlineFilter

__all__ = [
    "argmax_shares",
    "drawn",
    "in_output_space",
    "normals",
    "output_space",
    "sample_outputs",
    "sample_outputs_each",
]

#: Numbers of the stacked Jacobians (groups x N C x D) formed at once, and of the repeated-rows
#: test (N x N x I per group).
_CHUNK_NUMBERS = 1 << 24


def sample_outputs(
    f: OnlineFilter[S],
    state: S,
    x: Tensor,
    n: int,
    generator: torch.Generator | None,
    linearized: bool,
) -> Tensor:
    """n draws mu(eta) (n, N, C) for validated rows x (N, I) (module docstring)."""
    theta = state.mean
    if f.network.linear_in_params or linearized:
        if x.shape[0] == 1:  # one row (a context whose outputs are the arms): nothing repeats
            unique, inverse = x, torch.zeros(1, dtype=torch.long, device=x.device)
        else:
            unique, inverse = torch.unique(x, dim=0, return_inverse=True)
        N, C = unique.shape[0], f.network.output_dim
        if in_output_space(f, N, linearized):  # fewer outputs than parameters
            mean, cov = output_space(f, state, unique)
            if all_finite(cov):  # else the parameter draw below says what is wrong
                z = normals((n, N * C), generator, mean)
                eta = drawn(mean, cov, z).reshape(n, N, C)
                return f.likelihood.mean(eta[:, inverse])
        if linearized and not f.network.linear_in_params:
            g, J = f.network.jacobian(theta, unique)
            d = f.sample(state, n, generator) - theta  # (n, D)
            eta = g + torch.einsum("ncd,sd->snc", J, d)
            return f.likelihood.mean(eta[:, inverse])
    return f.likelihood.mean(f.network.apply(f.sample(state, n, generator), x))


def sample_outputs_each(
    f: OnlineFilter[S],
    state: S,
    x: Tensor,
    n: int,
    generator: torch.Generator | None,
    linearized: bool,
) -> Tensor:
    """``sample_outputs`` of each of G groups of validated rows x (G, N, I): (G, n, N, C).

    Group g's n draws are its own, independent of the other groups' (as G separate calls). Where
    the outputs are drawn in output space, every group's projection and factorisation is one
    batched call (in chunks of groups); otherwise one ``sample_outputs`` per group."""
    (G, N, I), C, D = x.shape, f.network.output_dim, f.num_params
    small = N * N * I <= _CHUNK_NUMBERS  # the repeated-rows test of one group
    if (f.network.linear_in_params or linearized) and D >= N * C and small:
        step = max(1, _CHUNK_NUMBERS // (N * C * D))
        parts = [_each(f, state, x[at : at + step], n, generator) for at in range(0, G, step)]
        done = [p for p in parts if p is not None]
        if len(done) == len(parts):  # one part: its view, not a copy
            return done[0] if len(done) == 1 else torch.cat(done)
    return torch.stack([sample_outputs(f, state, x[i], n, generator, linearized) for i in range(G)])


def _each(
    f: OnlineFilter[S], state: S, x: Tensor, n: int, generator: torch.Generator | None
) -> Tensor | None:
    """Output-space draws of the groups x (G, N, I), (G, n, N, C); None if a projection is not
    finite (the per-group draws then say what is wrong)."""
    (G, N, I), C = x.shape, f.network.output_dim
    g, J = f.network.jacobian(state.mean, x.reshape(G * N, I))
    cov = f.algorithm.project(state, DenseJacobian(J.reshape(G, N * C, -1)))  # (G, NC, NC)
    if not all_finite(cov):
        return None
    # F z^T in float32, (G, NC, NC) @ (G, NC, n): one batched product with n as its wide
    # dimension is 8x faster than z F^T (n, NC) per group, and 8x faster again than in float64
    # (the draws are Monte Carlo; their float32 rounding is far below its error, as z's is).
    # The draws stay in that layout, n innermost, and are answered as a (G, n, N, C) view of it:
    # a transposing copy into rows of C cost more than the draws (and ``argmax_shares`` reduces
    # along C at any stride).
    z = torch.randn((G, N * C, n), generator=generator, dtype=torch.float32, device=g.device)
    Fz = torch.bmm(psd_sqrt(cov).to(torch.float32), z)
    # g added in float32 too, in place: promoting the draws to g's float64 copied them twice
    eta = Fz.add_(g.reshape(G, N * C, 1).to(torch.float32)).reshape(G, N, C, n)
    if N > 1:
        first = _first_repeats(x)
        eta = eta.gather(1, first[:, :, None, None].expand(G, N, C, n))
    return f.likelihood.mean(eta.permute(0, 3, 1, 2))


def in_output_space(f: OnlineFilter[S], rows: int, linearized: bool) -> bool:
    """Whether the draws of ``rows`` distinct rows are drawn in output space: a network linear
    in its parameters, or ``linearized``, with no more outputs (rows x C) than parameters."""
    linear = f.network.linear_in_params or linearized
    return linear and f.num_params >= rows * f.network.output_dim


def output_space(f: OnlineFilter[S], state: S, x: Tensor) -> tuple[Tensor, Tensor]:
    """g(m, x) flattened (N C,) and Omega = J Sigma J^T (N C, N C) of rows x (N, I): the law
    N(g, Omega) that output-space draws come from."""
    N, C = x.shape[0], f.network.output_dim
    g, J = f.network.jacobian(state.mean, x)
    cov = f.algorithm.project(state, DenseJacobian(J.reshape(1, N * C, -1)))[0]
    return g.reshape(N * C), cov


def drawn(g: Tensor, cov: Tensor, z: Tensor) -> Tensor:
    """Draws g + z Omega^{1/2} (n, K) of N(g, Omega) from standard normals z (n, K); g (K,),
    Omega (K, K) finite (``eigh`` does not take NaN)."""
    return g + z @ psd_sqrt(cov).mT


def argmax_shares(draws: Tensor) -> tuple[Tensor, Tensor]:
    """For draws (G, M, A) of any strides: each draw's arg-max (G, M) (ties: the lowest index)
    and, per group, the share of its M draws whose arg-max is a, (G, A) in float64.

    The arg-max is taken as the largest of (A - a) over the a that reach the draw's maximum: two
    reductions that run along M wherever M is the innermost axis (``torch.argmax`` along a short
    axis is several times slower, and slower still across strides)."""
    G, M, A = draws.shape
    top = draws.amax(dim=2, keepdim=True)
    back = torch.arange(A, 0, -1, dtype=torch.uint8 if A < 256 else torch.long, device=draws.device)
    winners = A - ((draws == top) * back).amax(dim=2).long()
    ones = torch.ones((G, M), dtype=torch.float64, device=draws.device)
    counts = ones.new_zeros((G, A)).scatter_add_(1, winners, ones)
    return winners, counts / M


def normals(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normals of ``shape`` in ``like``'s dtype and device, drawn in float32 (a float64
    draw costs about 5x as much on a CPU; z's rounding, 2^-24 relative, is far below the Monte
    Carlo error of any use of the draws)."""
    z = torch.randn(shape, generator=generator, dtype=torch.float32, device=like.device)
    return z.to(like.dtype)


def _first_repeats(rows: Tensor) -> Tensor:
    """For rows (G, N, I): the index of each row's first identical row in its group, (G, N)."""
    G, N, I = rows.shape
    step = max(1, _CHUNK_NUMBERS // (N * N * I))  # groups per chunk of the N x N test
    parts = []
    for start in range(0, G, step):
        r = rows[start : start + step]
        same = (r.unsqueeze(2) == r.unsqueeze(1)).all(-1)  # (g, N, N), true on the diagonal
        parts.append(same.to(torch.int8).argmax(-1))  # argmax: the first maximal index
    return torch.cat(parts)
