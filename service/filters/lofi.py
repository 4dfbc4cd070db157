"""LoFi: the low-rank extended Kalman filter with diagonal-plus-low-rank precision (``docs/algorithms.md`` 3.5).

=========  ==========  ==============================================================
symbol     shape       meaning
=========  ==========  ==============================================================
m          (D,)        mean
Upsilon    (D,)        diagonal of the precision (``upsilon``), > 0
W          (d, D)      low-rank factor of the precision, stored as rows (``W``):
                       Sigma^{-1} = diag(Upsilon) + W^T W. Only W^T W is identified.
=========  ==========  ==============================================================

The rows-as-directions layout (d, D) keeps each direction contiguous; it is the transpose of the
paper's D x d W.

predict (exact, by Woodbury; rebayes ``_lofi_diagonal_cov_predict``)::

    Upsilon' = Upsilon / (gamma^2 + q Upsilon)
    C        = (I_d + q W diag(Upsilon'/Upsilon) W^T)^{-1} = L^{-T} L^{-1}
    W'       = gamma L^{-1} W diag(Upsilon'/Upsilon)          (so W'^T W' = gamma^2 D W^T C W D)
    m'       = gamma m

update (rebayes ``_lofi_diagonal_cov_condition_on``): the mean takes the exact EKF gain under
Sigma = (diag(Upsilon) + W^T W)^{-1} (covariance form, Sigma J^T by Woodbury on W); then the
precision diag(Upsilon) + W~^T W~ with W~ = [W; A^T H] (A A^T = R^{-1}, A^T = L_R^{-1}) is truncated
back to rank d: with W~ W~^T = Q diag(s^2) Q^T (eigenvalues ascending),

    W_+ = Q_top^T W~   (the d leading directions),   E = Q_rest^T W~,
    Upsilon_+ = Upsilon + colsum(E * E)

which keeps the diagonal of the precision exactly, whatever Q is. The decomposition is the
eigendecomposition of the small (d+C) x (d+C) Gram matrix (as rebayes' ``_fast_svd``), taken in
float64 whatever the state's dtype; since W_+ = Q^T W~ needs no division by singular values, the
squared condition number only blurs *which* near-degenerate directions are kept, and the tests check
that float32 keeps the float64 answer.

Samples: theta = m + x - L^T (W x) + L^T e with x ~ N(0, Upsilon^{-1}), e ~ N(0, I_d),
L = M^{-1} W Upsilon^{-1}, M = I + W Upsilon^{-1} W^T (Lambert, Bonnabel & Bach, L-RVGA 4.2.2; as
rebayes ``sample_dlr_single``): O(D d^2) set-up, O(D d) per draw.

References: Chang, Duran-Martin, Shestopaloff, Jones, Murphy (2023), arXiv 2305.19535.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from service.errors import InvalidSpec, StepRejected
from service.filters.base import Linearization, innovation
from service.filters.likelihoods import Likelihood
from service.filters.linalg import (
    Check,
    cholesky,
    finite_check,
    identity,
    positive_check,
    settle,
    symmetrise,
)
from service.filters.networks import Jacobian, Network

__all__ = ["LoFi", "LoFiState"]


@dataclass(frozen=True)
class LoFiState:
    """N(mean, (diag(upsilon) + W^T W)^{-1}): mean (D,), W (d, D), upsilon (D,)."""

    mean: Tensor
    W: Tensor
    upsilon: Tensor

    @functools.cached_property
    def capacitance_factor(self) -> Tensor:
        """L (d, d), lower, with L L^T = I_d + W Upsilon^{-1} W^T: the capacitance of the
        Woodbury identity, factored once per state (the state is immutable) and shared by every
        ``project`` chunk and ``sample`` call on it, as torch's LowRankMultivariateNormal does."""
        W = self.W
        eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
        return cholesky(symmetrise(eye + (W / self.upsilon) @ W.mT), what="the LoFi capacitance")


@dataclass(frozen=True)
class LoFi:
    """Diagonal-plus-rank-``rank`` precision filter.

    ``orthogonal``: the rows of W are orthogonal whenever an update begins, as they are without
    process noise (each truncation leaves W_+ W_+^T = diag(lambda_top), a decay only scales the
    rows, and the prior's W is 0). The truncation then takes W W^T as the diagonal of the rows'
    squared norms instead of computing it: the update's Gram product forms Z U^{-1} Z^T and
    J Z^T alone, (d + 2C) n D multiply-adds instead of 2 n^2 D (``docs/algorithms.md`` 3.5.5).
    ``build_filter`` sets it where the process noise is 0; ``OnlineFilter`` refuses it otherwise.
    """

    rank: int = 10
    name: str = "lofi"
    orthogonal: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 0:
            raise InvalidSpec(f"lofi rank must be an integer >= 0, got {self.rank!r}")

    def check_model(self, network: Network, likelihood: Likelihood) -> None:
        """Every network and likelihood."""

    def init(self, mean: Tensor, variance: float | Tensor) -> LoFiState:
        D = mean.shape[0]
        if isinstance(variance, Tensor):  # one prior variance per parameter (D,)
            upsilon = 1.0 / variance.to(mean)
        else:
            upsilon = torch.full_like(mean, 1.0 / variance)
        return LoFiState(mean=mean, W=mean.new_zeros((self.rank, D)), upsilon=upsilon)

    def predict(self, state: LoFiState, decay: float, process_noise: float) -> LoFiState:
        g2, q = decay**2, process_noise
        if q == 0.0:
            if decay == 1.0:
                return state
            return LoFiState(decay * state.mean, state.W / decay, state.upsilon / g2)
        ratio = 1 / (g2 + q * state.upsilon)  # Upsilon' / Upsilon
        Wr = state.W * ratio
        if self.rank:
            eye = identity(self.rank, Wr.dtype, Wr.device)
            L = cholesky(symmetrise(eye + q * (Wr @ state.W.mT)), what="the predict capacitance")
            # gamma L^{-1} W diag(ratio): a d x d inverse, then one pass over W (a wide
            # triangular solve is several times slower than the matmul).
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            W = (decay * Linv) @ Wr
        else:
            W = Wr
        return LoFiState(decay * state.mean, W, state.upsilon * ratio)

    def project(self, state: LoFiState, J: Jacobian) -> Tensor:
        """J Sigma J^T (N, C, C) by Woodbury (``docs/algorithms.md`` 3.5.3, 4.1)::

            Omega = J U^{-1} J^T - (L_M^{-1} B)^T (L_M^{-1} B),   B = (W U^{-1}) J^T  (N, d, C)

        J U^{-1} J^T is ``J.gram(1 / Upsilon)`` and B is ``J.jvp(W / Upsilon)``, the d rows of
        W U^{-1} as directions: neither needs J as an array when the network has structure.
        """
        JUJ = J.gram(torch.reciprocal(state.upsilon))
        if not self.rank:
            return JUJ
        B = J.jvp(state.W / state.upsilon)  # (N, d, C)
        LB = torch.linalg.solve_triangular(state.capacitance_factor, B, upper=False)
        return symmetrise(JUJ - LB.mT @ LB)

    def condition_on(
        self, state: LoFiState, lin: Linearization, y: Tensor
    ) -> tuple[LoFiState, Tensor, tuple[Check, ...]]:
        d, C = self.rank, lin.J.shape[0]
        W, J, ups = state.W, lin.J, state.upsilon
        n = d + C
        # One buffer [Z Upsilon^{-1}; Z] with Z = [W; J], and both Gram matrices in one product.
        buf = W.new_empty((2 * n, W.shape[1]))
        torch.div(W, ups, out=buf[:d])
        torch.div(J, ups, out=buf[d:n])
        buf[n : n + d] = W
        buf[n + d :] = J
        Zu, Z = buf[:n], buf[n:]
        if self.orthogonal and d:  # W W^T = diag(|w_i|^2): Z U^{-1} Z^T, then J Z^T
            Gw = Zu @ Z.mT  # (n, n)
            JZ = buf[n + d :] @ Z.mT  # (C, n): J W^T, J J^T
            top = torch.cat([torch.diag_embed((W * W).sum(1)), JZ[:, :d].mT], 1)
            Gp = torch.cat([top, JZ])  # Z Z^T
        else:
            grams = buf @ Z.mT  # (2n, n): Z U^{-1} Z^T over Z Z^T
            Gw, Gp = grams[:n], grams[n:]
        # J Sigma J^T and, for the mean, Sigma J^T w, by Woodbury on W.
        if d:
            eye = identity(d, W.dtype, W.device)
            L = cholesky(symmetrise(eye + Gw[:d, :d]), what="the LoFi capacitance")
            X = torch.cholesky_solve(Gw[:d, d:], L)  # (d, C)
            JSJ = symmetrise(Gw[d:, d:] - Gw[:d, d:].mT @ X)
        else:
            X = Gw[:0, d:]
            JSJ = symmetrise(Gw)
        inn = innovation(JSJ, lin, y)
        mean = state.mean + torch.cat([-(X @ inn.w), inn.w]) @ Zu

        # Truncate diag(Upsilon) + W~^T W~, W~ = T Z with T = blockdiag(I_d, L_R^{-1} V).
        TJ, checks = _whitener(lin)
        T = W.new_zeros((n, n))
        T[:d, :d] = identity(d, W.dtype, W.device)
        T[d:, d:] = TJ
        G = symmetrise(T @ Gp @ T.mT)
        try:
            _, Q = torch.linalg.eigh(G.to(torch.float64))
        except RuntimeError:  # torch.linalg.LinAlgError on non-finite input: say which value
            settle(inn.checks)
            raise StepRejected(
                "non_finite", "the step made the LoFi truncation non-finite"
            ) from None
        Y = (Q.flip(-1).mT.to(W.dtype) @ T) @ Z  # rows: directions, leading first
        E = Y[d:]
        upsilon = ups + (E * E).sum(0)
        return LoFiState(mean=mean, W=Y[:d], upsilon=upsilon), JSJ, (*inn.checks, *checks)

    def validity(self, state: LoFiState) -> tuple[Check, ...]:
        return (
            finite_check("the mean and the low-rank factor W", state.mean, state.W),
            positive_check("the diagonal precision Upsilon", state.upsilon),
        )

    def sample(self, state: LoFiState, n: int, generator: torch.Generator | None) -> Tensor:
        D, dtype, device = state.mean.shape[0], state.mean.dtype, state.mean.device
        x = torch.randn((n, D), generator=generator, dtype=dtype, device=device)
        x = x * torch.rsqrt(state.upsilon)
        if not self.rank:
            return state.mean + x
        e = torch.randn((n, self.rank), generator=generator, dtype=dtype, device=device)
        # M^{-1} W Upsilon^{-1} (d, D): a d x d inverse, then one pass (a solve against the wide
        # right-hand side is an order of magnitude slower).
        Lt = torch.cholesky_inverse(state.capacitance_factor) @ (state.W / state.upsilon)
        return state.mean + x + (e - x @ state.W.mT) @ Lt

    def precision(self, state: LoFiState) -> Tensor:
        """Dense diag(Upsilon) + W^T W (D, D); for tests and small D."""
        return torch.diag(state.upsilon) + state.W.mT @ state.W

    def covariance(self, state: LoFiState) -> Tensor:
        return torch.cholesky_inverse(cholesky(self.precision(state), what="the precision"))

    def state_bytes(self, state: LoFiState) -> int:
        return sum(t.numel() * t.element_size() for t in (state.mean, state.W, state.upsilon))


def _whitener(lin: Linearization) -> tuple[Tensor, tuple[Check, ...]]:
    """L_R^{-1} V (C, C), the rows that whiten the observation's share of the truncation, with
    the checks it defers. One output: V / sqrt(R), R's positivity a deferred check (no
    factorisation and no host sync); several: by the Cholesky factor of R (which raises now)."""
    R = lin.R
    if R.shape[-1] == 1:
        r = R[0, 0]
        TJ = r.rsqrt().reshape(1, 1)
        check = Check("not_psd", "the observation covariance R is not positive definite", r.log())
        return (TJ if lin.V is None else TJ * lin.V), (check,)
    LR = cholesky(R, what="the observation covariance R")
    M = lin.V if lin.V is not None else identity(R.shape[-1], R.dtype, R.device)
    return torch.linalg.solve_triangular(LR, M, upper=False), ()
