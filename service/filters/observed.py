"""The Gaussian observation model a filter conditions on, at a belief's mean, for rows of inputs
(what ``service.influence`` weighs rows by; ``docs/algorithms.md`` 4.5).

For row i with network output eta_i (C,) and J Sigma J^T (C, C) under the belief, the likelihood's
linearisation (``Likelihood.linearize``: yhat, V = dmu/deta, R) gives the moments in output space:
yhat, the epistemic variance diag(V J Sigma J^T V^T) and the noise diag(R), each (C,); a row that
observed output k alone gets output k's (the restricted likelihood's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from service.filters.algorithm import Belief
from service.filters.online import OnlineFilter

__all__ = ["observed_moments"]


def observed_moments(
    f: OnlineFilter[Belief], state: Belief, X: Tensor, outputs: Sequence[int | None]
) -> list[tuple[list[float], list[float], list[float]]]:
    """Per row of X (N, I), the moments of the Gaussian observation model the filter conditions
    on (``Likelihood.linearize`` at the belief's mean): yhat, the epistemic diag(H Sigma H^T)
    and the noise diag(R), each (C,), or of output ``outputs[i]`` alone where given."""
    eta, J = f.network.jacobian_operator(state.mean, X)
    var_eta = f.algorithm.project(state, J)  # (N, C, C)
    out = []
    for i, k in enumerate(outputs):
        lik, e, v = f.likelihood, eta[i], var_eta[i]
        if k is not None:  # the one output it observed
            lik, e, v = lik.restrict(k), e[k : k + 1], v[k : k + 1, k : k + 1]
        lin = lik.linearize(e, e.new_zeros((e.shape[0], 0)))
        HSH = v if lin.V is None else lin.V @ v @ lin.V.mT
        out.append((lin.yhat, HSH.diagonal(), lin.R.diagonal()))
    flat = torch.stack([torch.stack(parts) for parts in out]).tolist()  # (N, 3, C)
    return [(m, s, r) for m, s, r in flat]
