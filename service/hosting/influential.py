"""``/influence``: the most influential rows of a model's recent window, weighed by its current
belief (``service.influence``, ``docs/algorithms.md`` 4.5).

The log keeps each window bucket's most surprising rows with their inputs; here their
leave-one-out figures are recomputed from the published belief's predictive at their inputs (one
batched predictive), which weighs every row by the same posterior. Where the belief moves between
rows by itself (dynamics other than static, a state-space model's transition) or is a point
estimate, a row's figures at its update are what there is, and they rank instead.
"""

from __future__ import annotations

from service.filters import Belief, OnlineFilter
from service.filters.gradient import point_estimate
from service.filters.observed import observed_moments
from service.filters.online import Dynamics
from service.filters.statespace import StateSpace
from service.hosting.hosted import HostedModel, Published
from service.influence import Influence, Influential, current_influence

__all__ = ["Ranked", "ranked", "reweighs"]

Ranked = list[tuple[Influential, Influence]]


def reweighs(f: OnlineFilter[Belief]) -> bool:
    """Whether the current belief weighs the kept rows: static dynamics, a posterior."""
    return (
        f.dynamics == Dynamics()
        and not isinstance(f.network, StateSpace)
        and not point_estimate(f.algorithm)
    )


def ranked(h: HostedModel, current: Published[Belief], top: int) -> Ranked:
    """The ``top`` rows of the window with their figures, largest size first (ties: newest)."""
    rows = h.influence.candidates()
    f = h.filter
    if not rows or not reweighs(f):
        scored = [(r, r.mark.at_update) for r in rows]
    else:
        outputs = [r.mark.output for r in rows]
        moments = observed_moments(
            f, current.state, h.tensor([list(r.mark.x) for r in rows]), outputs
        )
        scored = [
            (r, current_influence(r.mark.target, m, v, a))
            for r, (m, v, a) in zip(rows, moments, strict=True)
        ]
    scored.sort(key=lambda p: (p[1].size, p[0].version), reverse=True)
    return scored[:top]
