"""How much each observation moved its model (``docs/algorithms.md`` 4.5): the memory-perturbation
figures of Nickl, Xu, Tailor, Moellenhoff & Khan (2023), from a row's prediction error and
prediction variance, in plain floats.

For one row with target t (C,), pre-update predictive mean mu, epistemic variance s and
aleatoric variance r (each (C,), the moment-matched Gaussian of the likelihood; outputs taken as
independent), the update conditions on t through the linear-Gaussian observation t = mu + N(0,
s + r) in output space, and per output k:

    loo_shift_k = s_k e_k / (s_k + r_k),      e_k = t_k - mu_k

the prediction at the row after its update minus the prediction without it (the leave-one-out
prediction: the model refitted without the row is the belief before it); and

    size^2 = sum_k e_k^2 s_k / ((s_k + r_k) r_k) = delta^T P_+^{-1} delta

the Mahalanobis size of the mean step delta under the updated precision P_+^{-1} (for one
output: delta = P h e / (s + r), P_+^{-1} = P^{-1} + h h^T / r). Both are exact for a linear
model with a gaussian likelihood and one output (``tests/test_influence.py`` refits in closed
form); with several outputs they ignore the outputs' correlation, and through a link (bernoulli,
categorical, poisson) they are the moment-matched Gaussian's. An outlier is a large error
against a small prediction variance s + r, so its size is large.

:class:`InfluenceLog` keeps, per model, the largest sizes of a sliding window of recent rows in
``buckets`` buckets (each keeps its ``keep`` largest, so the window's top ``keep`` are exact),
and a cumulative histogram of every size since start (for ``/metrics``).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["BUCKETS", "KEEP", "Influence", "InfluenceLog", "Influential", "influence"]

#: Upper bounds of the histogram's buckets of ``size`` (then +Inf).
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
#: The most rows ``InfluenceLog.top`` gives (each bucket keeps this many).
KEEP = 50
#: The smallest aleatoric variance the figures divide by (a saturated class probability).
_R_FLOOR = 1e-12


@dataclass(frozen=True)
class Influence:
    size: float  # the Mahalanobis size of the mean step under the updated precision
    loo_shift: list[float]  # per output: the prediction minus its leave-one-out prediction


def influence(
    target: Sequence[float],
    mean: Sequence[float],
    epistemic: Sequence[float],
    aleatoric: Sequence[float],
) -> Influence:
    """One row's figures (see the module's docstring), each argument (C,)."""
    size2 = 0.0
    shift = []
    for t, m, s, r in zip(target, mean, epistemic, aleatoric, strict=True):
        e, r = t - m, max(r, _R_FLOOR)
        shift.append(s * e / (s + r))
        size2 += e * e * s / ((s + r) * r)
    return Influence(math.sqrt(size2), shift)


@dataclass(frozen=True, order=True)
class Influential:
    """One row in the log: ordered by ``size``."""

    size: float
    version: int  # the model's version after the row
    request_id: str | None = field(compare=False)
    row: int = field(compare=False)  # the row's index in its request
    influence: Influence = field(compare=False)


class InfluenceLog:
    """The largest sizes of the last ``window`` rows (between ``window - window // buckets`` and
    ``window`` once full), and the histogram of all sizes. Memory: at most ``buckets * keep``
    rows, whatever the traffic."""

    def __init__(self, window: int = 10_000, buckets: int = 10, keep: int = KEEP) -> None:
        if window < buckets or buckets < 1 or keep < 1:
            raise ValueError(f"window ({window}) must be at least buckets ({buckets}) >= 1")
        self.window, self.keep, self.bucket_size = window, keep, window // buckets
        self._closed: deque[list[Influential]] = deque(maxlen=buckets - 1)
        self._open: list[Influential] = []  # a min-heap of at most ``keep``
        self._open_n = 0
        self.counts = [0] * (len(BUCKETS) + 1)  # per bucket, the last +Inf
        self.total = 0.0

    def add(self, row: Influential) -> None:
        self.counts[bisect.bisect_left(BUCKETS, row.size)] += 1
        self.total += row.size
        if len(self._open) < self.keep:
            heapq.heappush(self._open, row)
        elif row > self._open[0]:
            heapq.heapreplace(self._open, row)
        self._open_n += 1
        if self._open_n >= self.bucket_size:
            if self._closed.maxlen:
                self._closed.append(self._open)
            self._open, self._open_n = [], 0

    def top(self, k: int) -> list[Influential]:
        """The window's ``k`` (at most ``keep``) largest, largest first (ties: newest first)."""
        rows = [r for bucket in (*self._closed, self._open) for r in bucket]
        return heapq.nlargest(min(k, self.keep), rows, key=lambda r: (r.size, r.version))

    @property
    def count(self) -> int:
        return sum(self.counts)
