"""Choosing an action from a posterior: Thompson sampling, UCB, greedy and epsilon-greedy.

Pure functions over a filter and its (one-step-ahead) belief; no web, store or metrics code.
Each candidate action is one row x_a of the model's inputs; the model predicts the expected
reward mu(g(theta, x_a)) (for bernoulli, the probability of reward 1). Rewards are maximised.

=========== ================================================= ====================================
strategy    action                                            propensities
=========== ================================================= ====================================
thompson    argmax_a of mu(g(theta_1, x_a)), theta_1 a draw   Monte Carlo: the share of M draws
            from the posterior                                theta_1..theta_M (the decision's
                                                              own draw among them) whose argmax
                                                              is a; so the chosen action's is at
                                                              least 1/M
ucb         argmax_a of mean_a + 2 sd_a (sd: epistemic)      exact: 1 for the argmax
greedy      argmax_a of mean_a                                exact: 1 for the argmax
epsilon     uniform with probability epsilon, else greedy     exact: eps/A + (1 - eps) [a = greedy]
=========== ================================================= ====================================

Ties go to the lowest index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from service.errors import InvalidInput
from service.filters import OnlineFilter
from service.filters.algorithm import S

__all__ = ["UCB_WIDTH", "Decision", "Strategy", "decide"]

Strategy = Literal["thompson", "ucb", "greedy", "epsilon"]
#: sd multiplier of the UCB strategy.
UCB_WIDTH = 2.0


@dataclass(frozen=True)
class Decision:
    action: int
    scores: list[float]
    propensities: list[float]
    samples: int | None  # Monte Carlo draws behind the propensities; None where exact


def decide(
    f: OnlineFilter[S],
    belief: S,
    X: Tensor,
    strategy: Strategy,
    *,
    epsilon: float = 0.1,
    generator: torch.Generator | None = None,
    propensity_samples: int = 256,
) -> Decision:
    """Pick one of the A rows of X (A, I) under ``belief`` (already predicted one step ahead)."""
    if f.network.output_dim != 1:
        raise InvalidInput(
            f"decide needs a model with one output (the expected reward), this one has "
            f"{f.network.output_dim}"
        )
    A = X.shape[0]
    if strategy == "thompson":
        draws = f.sample_outputs(belief, X, propensity_samples, generator)[..., 0]  # (M, A)
        _finite(draws)
        winners = draws.argmax(dim=1)
        counts = torch.bincount(winners, minlength=A).to(torch.float64)
        return Decision(
            action=int(winners[0]),
            scores=draws[0].tolist(),
            propensities=(counts / propensity_samples).tolist(),
            samples=propensity_samples,
        )
    pred = f.predictive(belief, X)
    mean = pred.mean[:, 0]
    scores = (
        mean + UCB_WIDTH * pred.epistemic[:, 0].clamp_min(0).sqrt() if strategy == "ucb" else mean
    )
    _finite(scores)
    best = int(scores.argmax())
    if strategy == "epsilon":
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        pick = int(torch.randint(A, (), generator=generator)) if u < epsilon else best
        props = [epsilon / A + (1 - epsilon) * (a == best) for a in range(A)]
        return Decision(pick, scores.tolist(), props, None)
    if strategy not in ("ucb", "greedy"):
        raise InvalidInput(f"unknown strategy {strategy!r}")
    return Decision(best, scores.tolist(), [float(a == best) for a in range(A)], None)


def _finite(t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise InvalidInput("the model's scores for these actions are not finite")
