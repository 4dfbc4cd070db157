"""Gauss-Hermite quadrature for the Poisson-lognormal mixture (``docs/algorithms.md`` 2.3, 2.4).

Y ~ Poisson(exp(e)) with e ~ N(g, v): its log mass and its CDF have no closed form; both are
64-point Gauss-Hermite sums, each centred where its integrand lives (see each function). Shapes
broadcast; everything stays in the inputs' dtype and device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from service.filters.linalg import may_stop_early

__all__ = ["poisson_lognormal_cdf", "poisson_lognormal_logpmf"]

_LOG_2PI = math.log(2 * math.pi)
_STILL = 1e-13  # a Newton step this small (relative) moves the mode by rounding
_GH_NODES, _GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(64)  # for E over N(0, 1)
_GH_LOGW = np.log(_GH_WEIGHTS / math.sqrt(2 * math.pi))


def poisson_lognormal_logpmf(y: Tensor, g: Tensor, v: Tensor) -> Tensor:
    """log P(Y = y) for Y ~ Poisson(exp(e)), e ~ N(g, v) with v > 0, by 64-point Gauss-Hermite
    quadrature centred on the mode of the integrand (found by Newton steps on its concave log:
    at most 30; on a CPU, outside a compile's trace, they stop once a step moves the mode by
    rounding, after 5-8 steps from this start, with the same mode to rounding)."""
    mode = torch.where(y > 0, torch.log(y + 0.5), g).minimum(g + v * y)
    early = may_stop_early(g)
    for _ in range(30):
        grad = y - torch.exp(mode) - (mode - g) / v
        step = grad / (torch.exp(mode) + 1 / v)
        mode = mode + step
        if early and bool((step.abs() <= _STILL * (1 + mode.abs())).all()):
            break
    scale = torch.rsqrt(torch.exp(mode) + 1 / v)
    nodes = torch.as_tensor(_GH_NODES, dtype=g.dtype, device=g.device)
    logw = torch.as_tensor(_GH_LOGW, dtype=g.dtype, device=g.device)
    e = mode.unsqueeze(-1) + scale.unsqueeze(-1) * nodes  # (N, C, Q)
    yq, gq, vq = y.unsqueeze(-1), g.unsqueeze(-1), v.unsqueeze(-1)
    log_f = (
        yq * e
        - torch.exp(e)
        - torch.lgamma(yq + 1)
        - 0.5 * (e - gq) ** 2 / vq
        - 0.5 * torch.log(2 * math.pi * vq)
    )
    log_int = torch.logsumexp(logw + 0.5 * nodes**2 + log_f, dim=-1)
    return log_int + torch.log(scale) + 0.5 * _LOG_2PI


def poisson_lognormal_cdf(k: Tensor, g: Tensor, v: Tensor) -> Tensor:
    """P(Y <= k) for Y ~ Poisson(exp(e)), e ~ N(g, v); k >= 0 integers; shapes broadcast.

    Two exact forms, each integrated by 64-point Gauss-Hermite quadrature where its integrand is
    smooth on the scale of its density: over e, E[Q(k + 1, exp(e))], when v (k + 1) <= 1 (the
    step of Q in e, about 1/sqrt(k + 1) wide, is wider than sd(e)); otherwise, by
    P(Poisson(lam) <= k) = P(Gamma(k + 1) > lam), E[Phi((u - g) / sqrt(v))] over u = log G,
    G ~ Gamma(k + 1, 1), with nodes centred on u's mode log(k + 1), scale 1/sqrt(k + 1), and the
    density ratio in the weights. Agrees with adaptive quadrature to about 1e-9.
    """
    nodes = torch.as_tensor(_GH_NODES, dtype=g.dtype, device=g.device)
    logw = torch.as_tensor(_GH_LOGW, dtype=g.dtype, device=g.device)
    kq, gq, vq = k.unsqueeze(-1), g.unsqueeze(-1), v.unsqueeze(-1)
    over_e = (torch.special.gammaincc(kq + 1, torch.exp(gq + vq.sqrt() * nodes)) * logw.exp()).sum(
        -1
    )
    a = kq + 1
    scale = torch.rsqrt(a)
    u = torch.log(a) + scale * nodes
    log_ratio = (  # log Gamma density of u minus log N(log a, scale^2) density at u
        a * u - torch.exp(u) - torch.lgamma(a) + 0.5 * nodes**2 + torch.log(scale) + 0.5 * _LOG_2PI
    )
    z = (u - gq) * torch.rsqrt(vq.clamp_min(torch.finfo(g.dtype).tiny))
    over_u = (torch.special.ndtr(z) * torch.exp(logw + log_ratio)).sum(-1)
    return torch.where(v * (k + 1) <= 1, over_e, over_u).clamp(0, 1)
