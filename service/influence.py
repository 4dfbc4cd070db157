"""How much each observation moved its model (``docs/algorithms.md`` 4.5): the memory-perturbation
figures of Nickl, Xu, Tailor, Moellenhoff & Khan (2023), from a row's prediction error and
prediction variance, in plain floats.

For one row with target t (C,) and a Gaussian predictive in output space (the likelihood's
moment-matched one; outputs taken as independent), per output k, with e_k = t_k - mu_k:

- from the belief *before* the row (epistemic s, aleatoric r; what ``/update`` answers)::

      loo_shift_k = s_k e_k / (s_k + r_k)               size^2 = sum_k e_k^2 s_k / ((s_k + r_k) r_k)

- from a belief that *holds* the row (epistemic v, aleatoric r; what ``/influence`` ranks by, the
  model as it is now)::

      loo_shift_k = v_k e_k / (r_k - v_k)               size^2 = sum_k e_k^2 v_k / (r_k - v_k)^2

``loo_shift`` is the prediction at the row minus its leave-one-out prediction (the belief without
the row), ``size`` the Mahalanobis length of the mean step the row makes, delta^T P^{-1} delta
under the precision that holds it (delta = P h e / (s + r), or Sigma h e / (r - v): removing a
row by Sherman-Morrison). The two are the same numbers at the moment of the update, and exact for
a linear model with a gaussian likelihood and one output with static dynamics
(``tests/test_influence.py`` refits in closed form); with several outputs they ignore the
outputs' correlation, and through a link they are the moment-matched Gaussian's.

A row's size at its update scales with how much the model could still move (size^2 = z^2 s / r,
z the standardised error): the first rows of a fresh model move it most. Under the current
belief every row is weighed by the same posterior, so outliers and label errors (large e) rank
first. :class:`InfluenceLog` keeps, per model, the most surprising rows (largest z^2) of a
sliding window, with their inputs, so that ``/influence`` can weigh them by the current belief;
and a cumulative histogram of every size at update (for ``/metrics``).
"""

from __future__ import annotations

import array
import bisect
import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

__all__ = [
    "BUCKETS",
    "KEEP",
    "Influence",
    "InfluenceLog",
    "Influential",
    "Mark",
    "current_influence",
    "influence",
    "mark",
    "surprise",
]

#: Upper bounds of the histogram's buckets of ``size`` (then +Inf).
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
#: The most rows ``InfluenceLog.top`` gives (each bucket keeps this many).
KEEP = 50
#: The smallest variance the figures divide by (a saturated class probability).
_FLOOR = 1e-12


@dataclass(frozen=True)
class Influence:
    size: float  # the Mahalanobis size of the mean step
    loo_shift: list[float]  # per output: the prediction minus its leave-one-out prediction


def influence(
    target: Sequence[float],
    mean: Sequence[float],
    epistemic: Sequence[float],
    aleatoric: Sequence[float],
) -> Influence:
    """A row's figures from the belief before it (see the module's docstring), each (C,)."""
    size2, shift = 0.0, []
    for t, m, s, r in zip(target, mean, epistemic, aleatoric, strict=True):
        e, r = t - m, max(r, _FLOOR)
        shift.append(s * e / (s + r))
        size2 += e * e * s / ((s + r) * r)
    return Influence(math.sqrt(size2), shift)


def current_influence(
    target: Sequence[float],
    mean: Sequence[float],
    epistemic: Sequence[float],
    aleatoric: Sequence[float],
) -> Influence:
    """A row's figures from a belief that holds it (see the module's docstring), each (C,):
    :func:`influence` of the belief without it, by Sherman-Morrison s = v r / (r - v), with the
    error there e_- = e r / (r - v)."""
    before_mean, before_var = [], []
    for t, m, v, r in zip(target, mean, epistemic, aleatoric, strict=True):
        gap = max(r - v, _FLOOR)
        before_mean.append(t - (t - m) * r / gap)
        before_var.append(v * r / gap)
    return influence(target, before_mean, before_var, aleatoric)


def surprise(
    target: Sequence[float],
    mean: Sequence[float],
    epistemic: Sequence[float],
    aleatoric: Sequence[float],
) -> float:
    """z^2 = sum_k e_k^2 / (s_k + r_k) under the belief before the row."""
    return sum(
        (t - m) ** 2 / (s + max(r, _FLOOR))
        for t, m, s, r in zip(target, mean, epistemic, aleatoric, strict=True)
    )


@dataclass(frozen=True)
class Mark:
    """What a row leaves for the log: its figures at its update, its surprise (z^2), and what
    re-weighing it takes (its input, its target, the one output it observed; None: all)."""

    at_update: Influence
    surprise: float
    x: Sequence[float]  # the request's row; an ``array`` once the log keeps it
    target: tuple[float, ...]
    output: int | None = None


def mark(
    x: Sequence[float],
    target: Sequence[float],
    mean: Sequence[float],
    epistemic: Sequence[float],
    aleatoric: Sequence[float],
    output: int | None = None,
) -> Mark:
    """A row's :class:`Mark` from its predictive before the update (each (C,))."""
    return Mark(
        influence(target, mean, epistemic, aleatoric),
        surprise(target, mean, epistemic, aleatoric),
        x,
        tuple(target),
        output,
    )


@dataclass(frozen=True)
class Influential:
    """One row in the log: where it came from, and its mark."""

    version: int  # the model's version after the row
    request_id: str | None
    row: int  # the row's index in its request
    mark: Mark


class InfluenceLog:
    """The ``keep`` most surprising rows of each of ``buckets`` buckets of the last ``window``
    rows (between ``window - window // buckets`` and ``window`` once full), and the histogram of
    every size at update. Memory: at most ``buckets * keep`` rows, whatever the traffic; a kept
    row's input is copied into an ``array`` of ``typecode`` ("f" for a model below float64: no
    number is lost), the others are never copied."""

    def __init__(
        self, window: int = 10_000, buckets: int = 10, keep: int = KEEP, typecode: str = "d"
    ) -> None:
        if window < buckets or buckets < 1 or keep < 1:
            raise ValueError(f"window ({window}) must be at least buckets ({buckets}) >= 1")
        self.window, self.keep, self.bucket_size = window, keep, window // buckets
        self.typecode = typecode
        # each bucket a min-heap of (surprise, version, row): versions are unique, so rows are
        # never compared
        self._closed: deque[list[tuple[float, int, Influential]]] = deque(maxlen=buckets - 1)
        self._open: list[tuple[float, int, Influential]] = []
        self._open_n = 0
        self.counts = [0] * (len(BUCKETS) + 1)  # per bucket of sizes, the last +Inf
        self.total = 0.0

    def add(self, row: Influential) -> None:
        m = row.mark
        self.counts[bisect.bisect_left(BUCKETS, m.at_update.size)] += 1
        self.total += m.at_update.size
        full = len(self._open) >= self.keep
        if not full or m.surprise > self._open[0][0]:
            kept = replace(row, mark=replace(m, x=array.array(self.typecode, m.x)))
            entry = (m.surprise, row.version, kept)
            if full:
                heapq.heapreplace(self._open, entry)
            else:
                heapq.heappush(self._open, entry)
        self._open_n += 1
        if self._open_n >= self.bucket_size:
            if self._closed.maxlen:
                self._closed.append(self._open)
            self._open, self._open_n = [], 0

    def candidates(self) -> list[Influential]:
        """The rows kept of the window (a superset of its ``keep`` most surprising)."""
        return [r for bucket in (*self._closed, self._open) for _, _, r in bucket]

    @property
    def count(self) -> int:
        return sum(self.counts)
