"""IVON, the improved variational online Newton method (Shen, Daheim, Cong, Nickl, Marconi,
Bazan, Yokota, Gurevych, Cremers, Khan & Moellenhoff 2024, Algorithm 1; the Bayesian learning
rule of Khan & Rue 2023 for a diagonal Gaussian), one natural-gradient step per observation
(``docs/algorithms.md`` 3.12).

The belief is q(theta) = N(m, diag(sigma^2)), sigma^2 = 1 / (lambda (h + delta)): ``lambda`` the
effective sample size (``ess``, the data the posterior stands for), ``delta`` the prior's
precision per sample (delta_i = 1 / (lambda sigma_0,i^2), so that h = 0 is the prior), h the
running estimate of the loss's Hessian diagonal, from ``hess_init`` h_0 (IVON's: a start with no
curvature, h_0 = 0, makes the first steps Newton steps of the prior's size). One row (x, y), loss l(theta) = -log p(y |
g(theta, x)) of the model's likelihood, S Monte Carlo samples (``mc_samples``)::

    eps_s ~ N(0, I),  theta_s = m + sigma eps_s
    g_hat = mean_s grad l(theta_s)                       (the gradient at samples of q)
    h_hat = mean_s grad l(theta_s) * eps_s / sigma       (Stein / reparameterisation Hessian)
    gbar  = beta1 gbar + (1 - beta1) g_hat
    h     = beta2 h + (1 - beta2) h_hat + (1 - beta2)^2 (h - h_hat)^2 / (2 (h + delta))
    m     = m - lr (gbar / (1 - beta1^t) + delta m) / (h + delta)

The last term of h's update keeps h + delta > 0 whatever h_hat is: h' + delta = (h + delta)
(1 + (1 + a u)^2) / 2 with a = 1 - beta2, u = (h_hat - h) / (h + delta). The draws come from a
generator seeded by (``seed``, t): a step is a pure function of its inputs, and replays bit for bit.

**Fixed point on a linear-Gaussian model.** Cycling over N rows with lambda = N, the expected
loss is quadratic, so E_q[grad l] = grad l(m) and E[h_hat] = diag(H), H = (1/N) sum_i h_i h_i^T / r
the loss's (constant) Hessian. At the fixed point gbar = 0 gives grad l(m) + delta m = 0: m is the
exact posterior mean; and h = diag(H) gives the precision lambda (h + delta) = diag(Lambda), the
diagonal of the exact posterior precision Lambda = sum_i h_i h_i^T / r + Sigma_0^{-1}. That is the
mean-field Gaussian closest to the posterior in KL(q || p): the exact mean, and variances
1 / Lambda_ii, smaller than the posterior's marginals (Lambda^{-1})_ii wherever the parameters
are correlated (``tests/test_ivon.py``).

=========  ======  ==============================================================
field      shape   meaning
=========  ======  ==============================================================
mean       (D,)    m
hess       (D,)    h, the Hessian estimate
momentum   (D,)    gbar
delta      (D,)    the prior's precision per sample, 1 / (lambda sigma_0^2)
t          ()      steps taken (for the momentum's bias correction and the draws)
=========  ======  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from service.filters.base import Linearization
from service.filters.gradient import _full_row, _observed
from service.filters.likelihoods import Gaussian, Likelihood
from service.filters.linalg import Check, finite_check, positive_check
from service.filters.networks import Jacobian, Network

__all__ = ["IVON", "IVONState"]


@dataclass(frozen=True)
class IVONState:
    mean: Tensor
    hess: Tensor
    momentum: Tensor
    delta: Tensor
    t: Tensor


def _nll(likelihood: Likelihood, g: Tensor, Y: Tensor, mask: Tensor) -> Tensor:
    """-log p(Y | g) over the observed outputs, summed over the samples: g (S, 1, C), Y and
    mask (1, C)."""
    if isinstance(likelihood, Gaussian):
        return (0.5 * mask * (Y - g) ** 2 / likelihood.r(g)).sum()
    return (-likelihood.log_prob(Y, g) * mask[:, 0]).sum()


@dataclass(frozen=True)
class IVON:
    """The variational online Newton learner (module docstring)."""

    learning_rate: float = 0.01
    ess: float = 1000.0
    beta1: float = 0.9
    beta2: float = 0.99999  # IVON's: averages h over ~1e5 steps, so it moves little in one pass
    mc_samples: int = 1
    seed: int = 0
    hess_init: float = 1.0  # h_0: the first steps' curvature (with h_0 = 0 they are prior-sized)
    name: str = "ivon"
    variational: bool = True  # a learner with a posterior (not a point estimate)

    def check_model(self, network: Network, likelihood: Likelihood) -> None:
        """Every network and likelihood."""

    def init(self, mean: Tensor, variance: float | Tensor) -> IVONState:
        var = torch.as_tensor(variance, dtype=mean.dtype, device=mean.device).expand(mean.shape)
        zero = torch.zeros_like(mean)
        return IVONState(
            mean=mean, hess=torch.full_like(mean, self.hess_init), momentum=zero,
            delta=1.0 / (self.ess * var), t=mean.new_zeros(()),
        )  # fmt: skip

    def variance(self, state: IVONState) -> Tensor:
        """sigma^2 = 1 / (lambda (h + delta)), (D,)."""
        return 1.0 / (self.ess * (state.hess + state.delta))

    def predict(self, state: IVONState, decay: float, process_noise: float) -> IVONState:
        """theta_t = decay theta_{t-1} + N(0, q I) on q: sigma^2 <- decay^2 sigma^2 + q, which
        moves h (delta is the prior's and stays)."""
        if decay == 1.0 and process_noise == 0.0:
            return state
        var = decay**2 * self.variance(state) + process_noise
        hess = 1.0 / (self.ess * var) - state.delta
        return IVONState(decay * state.mean, hess, state.momentum, state.delta, state.t)

    def project(self, state: IVONState, J: Jacobian) -> Tensor:
        """J diag(sigma^2) J^T (N, C, C)."""
        return J.gram(self.variance(state))

    def condition_on(
        self, state: IVONState, lin: Linearization, y: Tensor
    ) -> tuple[IVONState, Tensor, tuple[Check, ...]]:
        raise TypeError("ivon learns by natural-gradient steps (``learn``), not by conditioning")

    def learn(
        self, network: Network, likelihood: Likelihood, state: IVONState, x: Tensor, y: Tensor
    ) -> IVONState:
        """One IVON step on the row x (1, I), y encoded (C,) for ``network``."""
        full, k = _observed(network)
        Y, mask = _full_row(full, k, y)
        m, h, delta = state.mean, state.hess, state.delta
        t = int(state.t) + 1
        gen = torch.Generator(device=m.device).manual_seed(self.seed * 1_000_003 + t)
        sigma = torch.rsqrt(self.ess * (h + delta))
        eps = torch.randn(
            (self.mc_samples, m.shape[0]), generator=gen, dtype=m.dtype, device=m.device
        )
        with torch.enable_grad():
            theta = (m + sigma * eps).detach().requires_grad_(True)
            loss = _nll(likelihood, full.apply(theta, x), Y[None], mask[None])
            (grads,) = torch.autograd.grad(loss, theta)  # (S, D): each sample's own gradient
        g_hat = grads.mean(0)
        h_hat = (grads * eps).mean(0) / sigma
        gbar = self.beta1 * state.momentum + (1 - self.beta1) * g_hat
        a = 1 - self.beta2
        hess = (1 - a) * h + a * h_hat + 0.5 * a * a * (h - h_hat) ** 2 / (h + delta)
        step = gbar / (1 - self.beta1**t) + delta * m
        mean = m - self.learning_rate * step / (hess + delta)
        return IVONState(mean, hess, gbar, delta, state.t + 1)

    def validity(self, state: IVONState) -> tuple[Check, ...]:
        return (
            finite_check("the mean and Hessian estimate", state.mean, state.hess),
            positive_check("the precision h + delta", state.hess + state.delta),
        )

    def sample(self, state: IVONState, n: int, generator: torch.Generator | None) -> Tensor:
        m = state.mean
        eps = torch.randn((n, m.shape[0]), generator=generator, dtype=m.dtype, device=m.device)
        return m + eps * self.variance(state).sqrt()

    def covariance(self, state: IVONState) -> Tensor:
        return torch.diag(self.variance(state))

    def state_bytes(self, state: IVONState) -> int:
        fields = (state.mean, state.hess, state.momentum, state.delta, state.t)
        return sum(t.numel() * t.element_size() for t in fields)
