"""Choosing an action from a posterior: Thompson sampling, UCB, greedy and epsilon-greedy.

Pure functions over a filter and its (one-step-ahead) belief; no web, store or metrics code.
The candidates are the outputs of the rows X (A, I) the caller passes, one expected reward
each, mu(g(theta, x_a))_c (for bernoulli, the probability of reward 1); rewards are maximised.
Either A rows of a one-output model (each candidate action one input row x_a: action features,
or a context and an action's features), or one row of a model with C outputs, whose outputs are
the arms (the context alone: the neural bandit of Riquelme et al. 2018, VW's ``--cb_explore``);
below, a is the candidate's index either way and mu_a its expected reward.

=========== ================================================= ====================================
strategy    action                                            propensities
=========== ================================================= ====================================
thompson    argmax_a of mu_a under one draw (a draw of        Monte Carlo: the share of M draws
            theta, or of the linearised predictive when       (the decision's own draw among
            ``linearized``: ``service.filters.draws``)        them) whose argmax is a; so the
                                                              chosen action's is at least 1/M
ucb         argmax_a of mean_a + 2 sd_a (sd: epistemic)      exact: 1 for the argmax
greedy      argmax_a of mean_a                                exact: 1 for the argmax
epsilon     uniform with probability epsilon, else greedy     exact: eps/A + (1 - eps) [a = greedy]
=========== ================================================= ====================================

Ties go to the lowest index.

Several items at once (``decide_many``, the ``/decide/batch`` route): each item is decided
independently under the same belief, as by ``decide``, and the work is shared where that is
sound. Thompson on a linear network, or ``linearized``: every item's M draws in output space
from its own N(g(m, X_i), J_i Sigma J_i^T), all items' projections and factorisations batched
(``OnlineFilter.sample_outputs_each``): the law of ``decide``, item by item. Thompson by
parameter draws on any other network: a pool of M parameter draws theta_1..theta_M per up to M items evaluated on all of their
rows; item j decides by draw j of its pool (its own draw: no two items share one, so the
decisions are independent) and its propensities are the share of the pool's M draws (its own
among them) whose arg-max is a, so they are estimated from one shared set of draws: each is
unbiased, as in ``decide``, but the estimates of the items of one pool are correlated. ucb,
greedy and epsilon: one predictive over all items' rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from service.errors import InvalidInput
from service.filters import OnlineFilter
from service.filters.algorithm import S
from service.filters.draws import argmax_shares, normals
from service.filters.linalg import all_finite

if TYPE_CHECKING:
    from service.filters.compiled import DrawKernel

__all__ = ["UCB_WIDTH", "Decision", "Strategy", "decide", "decide_many"]

Strategy = Literal["thompson", "ucb", "greedy", "epsilon"]
#: sd multiplier of the UCB strategy.
UCB_WIDTH = 2.0
#: Numbers (draws x rows x layer width) a pool of parameter draws evaluates at once: about a
#: cache's worth (4 MiB of float32); 16 times more ran twice as slow on the Shuttle MLP.
_POOL_NUMBERS = 1 << 20


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
    linearized: bool = False,
    kernel: DrawKernel[S] | None = None,
) -> Decision:
    """Pick one of the candidates of X (A, I) (the A rows of a one-output model, or the C
    outputs of one row) under ``belief`` (already predicted one step ahead).

    ``kernel``: the compiled Thompson draws of one row (``compiled.DrawKernel``, of
    ``propensity_samples`` draws), used for a Thompson decision of one row from the same
    standard normals as the eager draws; where its checks fail, the eager draws decide (from
    the generator's next normals)."""
    _candidates(f, X.shape[0])
    M = propensity_samples
    if strategy == "thompson" and kernel is not None and kernel.samples == M and X.shape[0] == 1:
        z = normals((M, f.network.output_dim), generator, belief.mean)
        got = kernel(belief, X.to(belief.mean.dtype), z)
        if got is not None:
            return Decision(*got, M)
    if strategy == "thompson":
        draws = f.sample_outputs(belief, X, M, generator, linearized=linearized)  # (M, A, C)
        return _thompson(draws.reshape(1, M, -1), torch.zeros(1, dtype=torch.long))[0]
    pred = f.predictive(belief, X)
    mean, var = pred.mean.reshape(-1), pred.epistemic.reshape(-1)
    return _exact(mean, var, strategy, epsilon, generator)


def decide_many(
    f: OnlineFilter[S],
    belief: S,
    X: Tensor,
    sizes: Sequence[int],
    strategies: Sequence[Strategy],
    epsilons: Sequence[float],
    *,
    generator: torch.Generator | None = None,
    propensity_samples: int = 256,
    linearized: bool = False,
) -> list[Decision]:
    """Decide each of several items under ``belief`` (see the module's docstring): item i's
    candidates are those of the next ``sizes[i]`` rows of X (sum(sizes), I)."""
    for a in sizes:
        _candidates(f, a)
    starts = [0]
    for a in sizes:
        starts.append(starts[-1] + a)
    out: dict[int, Decision] = {}
    by_size: dict[int, list[int]] = {}
    exact: list[int] = []
    for i, strategy in enumerate(strategies):
        (by_size.setdefault(sizes[i], []) if strategy == "thompson" else exact).append(i)
    for A, items in by_size.items():
        if len(items) == len(sizes):  # every item: rows of A each, in order
            Xg = X.reshape(len(items), A, -1)  # (G, A, I)
        else:
            Xg = torch.stack([X[starts[i] : starts[i] + A] for i in items])
        chosen = _thompson_group(f, belief, Xg, propensity_samples, generator, linearized)
        out.update(zip(items, chosen, strict=True))
    if exact:
        rows = torch.cat([X[starts[i] : starts[i + 1]] for i in exact])
        pred = f.predictive(belief, rows)
        at = 0
        for i in exact:
            mean = pred.mean[at : at + sizes[i]].reshape(-1)
            var = pred.epistemic[at : at + sizes[i]].reshape(-1)
            out[i] = _exact(mean, var, strategies[i], epsilons[i], generator)
            at += sizes[i]
    return [out[i] for i in range(len(sizes))]


def _thompson_group(
    f: OnlineFilter[S],
    belief: S,
    Xg: Tensor,
    M: int,
    generator: torch.Generator | None,
    linearized: bool,
) -> list[Decision]:
    """Thompson decisions of G items with A rows each, Xg (G, A, I), A C candidates."""
    (G, A, I), C = Xg.shape, f.network.output_dim
    if f.network.linear_in_params or linearized:  # each item's own M draws, in output space
        draws = f.sample_outputs_each(belief, Xg, M, generator, linearized=linearized)
        return _thompson(draws.reshape(G, M, -1), torch.zeros(G, dtype=torch.long))
    width = f.num_params // I + C  # about the widest layer: activations per evaluated row
    step = max(1, _POOL_NUMBERS // (M * A * width))  # items evaluated at once
    out: list[Decision] = []
    for start in range(0, G, M):  # a pool of M draws per M items; item j decides by draw j
        theta = f.sample(belief, M, generator)  # (M, D)
        parts = []
        for at in range(start, min(start + M, G), step):
            rows = Xg[at : min(at + step, start + M, G)].reshape(-1, I)
            eta = f.network.apply(theta, rows)  # (M, g A, C)
            parts.append(f.likelihood.mean(eta).reshape(M, -1, A * C).transpose(0, 1))
        draws = torch.cat(parts)  # (g, M, A C)
        out += _thompson(draws, torch.arange(draws.shape[0]))
    return out


def _thompson(draws: Tensor, own: Tensor) -> list[Decision]:
    """Item g (of draws (G, M, A)) takes the arg-max of its draw ``own[g]``; its propensities
    are the arg-max shares of its M draws."""
    _finite(draws)
    G, M = draws.shape[:2]
    winners, shares = argmax_shares(draws)
    rows, own = torch.arange(G, device=draws.device), own.to(draws.device)
    actions, scores = winners[rows, own].tolist(), draws[rows, own].tolist()
    propensities = shares.tolist()
    return [Decision(actions[g], scores[g], propensities[g], M) for g in range(G)]


def _exact(
    mean: Tensor, var: Tensor, strategy: str, epsilon: float, generator: torch.Generator | None
) -> Decision:
    """ucb, greedy or epsilon over A candidates with predictive mean and epistemic variance (A,)."""
    A = mean.shape[0]
    scores = mean + UCB_WIDTH * var.clamp_min(0).sqrt() if strategy == "ucb" else mean
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


def _candidates(f: OnlineFilter[S], rows: int) -> None:
    """InvalidInput unless the candidates are rows of a one-output model or one row's outputs."""
    C = f.network.output_dim
    if rows > 1 and C > 1:
        raise InvalidInput(
            f"decide: {rows} action rows need a model with one output (the expected reward); "
            f"this one has {C}, one per arm: decide with its context alone (no actions)"
        )


def _finite(t: Tensor) -> None:
    if not all_finite(t):  # one sum: a non-finite entry makes it non-finite
        raise InvalidInput("the model's scores for these actions are not finite")
