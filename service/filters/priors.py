"""The prior variances sigma_0^2 of a model's parameters (``docs/algorithms.md`` 1.4).

Every parameter has the prior variance ``Prior.variance`` but the output layer's bias, the level
of eta (a mean, a logit, a log-rate): its variance is ``Prior.bias_variance``, by default the
likelihood's ``prior_bias_scale`` times ``variance``. Only the log link scales it (Poisson: 16, a
standard deviation four times the weights', as Gelman, Jakulin, Pittau & Su 2008 give the
intercept against the coefficients): a log-rate's level spans orders of magnitude, and a filter
whose belief is diagonal splits the first rows' level between the bias and the weights by their
prior variances, then keeps little variance to move it back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from service.filters.likelihoods import Likelihood
    from service.filters.networks import Network
    from service.filters.online import Prior

__all__ = ["prior_variance"]


def prior_variance(prior: Prior, network: Network, likelihood: Likelihood) -> float | Tensor:
    """sigma_0^2: a float when every parameter shares ``prior.variance``, else the (D,) float64
    variances with the output bias's ``bias_variance`` (or its default, module docstring)."""
    bias: slice | None = getattr(network, "output_bias", None)
    scale: float = getattr(likelihood, "prior_bias_scale", 1.0)
    b = prior.bias_variance if prior.bias_variance is not None else scale * prior.variance
    if bias is None or b == prior.variance:
        return prior.variance
    variance = torch.full((network.num_params,), prior.variance, dtype=torch.float64)
    variance[bias] = b
    return variance
