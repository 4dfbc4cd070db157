"""The warm-up of a projected filter: SGD from the prior mean over a warm-up set, and the
iterates its principal directions are taken from (``docs/algorithms.md`` 3.9.2, the talk's
"lottery subspace": train in full space on a warm-up set, keep the top d principal components
of the trajectory as A and the end point as theta_0).

Full-batch gradient descent with heavy-ball momentum, PyTorch's ``torch.optim.SGD`` convention::

    v_k = mu v_{k-1} + grad L(theta_{k-1}),    theta_k = theta_{k-1} - lr v_k,    v_0 = 0

on the mean loss over the N warm-up rows, L = (1/N) sum_n -log p(y_n | g(theta, x_n)), the
likelihood's own negative log-likelihood except for the gaussian, taken at unit noise (half the
squared error, so the learning rate does not scale with the noise variance). A row with an
``outputs`` entry k observes output k alone, as in ``/update``. Everything runs in float64 on the
CPU, in a fixed order: the same warm-up gives the same bits on the same machine, so a restart
rebuilds the same network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from service.errors import InvalidSpec
from service.filters.gradient import loss_likelihood
from service.filters.likelihoods import Likelihood
from service.filters.networks import Network

__all__ = ["sgd_trajectory"]


def sgd_trajectory(
    network: Network,
    likelihood: Likelihood,
    theta0: Tensor,
    x: Tensor,
    Y: Tensor,
    outputs: Sequence[int] | None,
    *,
    epochs: int,
    learning_rate: float,
    momentum: float,
    keep: int,
) -> tuple[Tensor, Tensor]:
    """(theta after ``epochs`` steps (D,), ``keep`` iterates (K, D) evenly spaced over the
    steps, the last one included), all float64.

    x (N, I); Y (N, C) encoded targets, or (N, 1) with ``outputs`` (N ints, row n observing
    output ``outputs[n]``). InvalidSpec, naming the learning rate, if SGD diverges."""
    f64 = torch.float64
    x, Y = x.to(f64), Y.to(f64)
    lik = loss_likelihood(likelihood)
    picks = None if outputs is None else torch.tensor(list(outputs)).unsqueeze(1)
    marks = {round(k * epochs / keep) for k in range(1, keep + 1)}
    theta = theta0.to(f64).clone()
    velocity = torch.zeros_like(theta)
    iterates: list[Tensor] = []
    for epoch in range(1, epochs + 1):
        t = theta.detach().requires_grad_(True)
        eta = network.apply(t, x)
        if picks is not None:
            eta = eta.gather(1, picks)
        loss = -lik.log_prob(Y, eta).mean()
        (grad,) = torch.autograd.grad(loss, t)
        velocity = momentum * velocity + grad
        theta = theta - learning_rate * velocity
        if epoch in marks:
            iterates.append(theta)
    if not bool(torch.isfinite(theta).all()):
        raise InvalidSpec(
            f"filter.warmup diverged: SGD at learning_rate {learning_rate:g} made the parameters "
            "non-finite; lower filter.warmup.learning_rate"
        )
    return theta, torch.stack(iterates)
