"""Online calibration from one-step-ahead predictions: pure, bounded, mergeable statistics.

Every update reports, for each row, the predictive distribution the model held *before* it saw
that row (``StepInfo``). Scoring those predictions against the row's label measures calibration
for free, with no held-out set: a well-specified, well-filtered model's central 90% intervals
cover 90% of the labels, its PIT values are uniform, and its probabilities mean what they say.

What is tracked (``docs/architecture.md`` section 5), over a sliding window of the last ``window``
observations kept as ``buckets`` additive :class:`Stats` (so the window slides one bucket at a
time and memory is bounded):

* ``nll``: mean negative log predictive density of the row (nats; for a multi-output gaussian,
  the joint density of the row);
* gaussian and poisson outputs, each output counted separately:
  central-interval coverage at 50/90/95% and a 10-bin PIT histogram. Each output supplies its
  PIT *interval* [F(y-), F(y)] (a point for continuous outputs). Coverage and histograms count
  the share of that interval inside the central interval / each bin: the non-randomised PIT of
  Czado, Gneiting & Held (2009, Biometrics 65:1254), whose expected histogram is uniform and whose
  expected coverage equals the nominal level under a calibrated count forecast, where plain
  quantile intervals of a discrete distribution would over-cover;
* gaussian: mean and variance of the standardised residual (y - mean) / sd (0 and 1 when
  calibrated);
* bernoulli and categorical: Brier score, log loss, a 10-bin reliability table and the expected
  calibration error.

Definitions, stated once:

* Brier score: bernoulli (p - y)^2 with p = P(y = 1); categorical sum_k (p_k - [y = k])^2
  (Brier 1950).
* ECE: 10 equal-width bins over [0, 1], ECE = sum_b (n_b / n) |acc_b - conf_b|. For bernoulli
  the binned quantity is p = P(y = 1) and acc_b is the frequency of y = 1 in the bin (the
  reliability diagram of the positive class); for categorical it is the top-label confidence
  max_k p_k and acc_b the frequency with which the top label is right (Guo et al. 2017).

Nothing here imports torch, web, store or metrics code: the engine feeds plain floats, and
``service.metrics`` only reads.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.influence import Mark

__all__ = [
    "BINS",
    "LEVELS",
    "CalibrationTracker",
    "Observation",
    "Stats",
    "gaussian_pit",
]

#: Nominal levels of the central intervals whose coverage is tracked.
LEVELS: tuple[float, ...] = (0.5, 0.9, 0.95)
#: Bins of the PIT histogram and of the reliability table (equal width over [0, 1]).
BINS = 10

_SQRT2 = math.sqrt(2.0)


def gaussian_pit(y: float, mean: float, variance: float) -> float:
    """Phi((y - mean) / sd): the PIT of y under N(mean, variance)."""
    return 0.5 * math.erfc(-(y - mean) / (_SQRT2 * math.sqrt(variance)))


def _overlap(lo: float, hi: float, a: float, b: float) -> float:
    """The share of [lo, hi] inside [a, b] (for lo == hi: 1 if a <= lo <= b, else 0)."""
    if hi - lo <= 1e-12:
        return 1.0 if a <= lo <= b else 0.0
    return max(0.0, min(hi, b) - max(lo, a)) / (hi - lo)


def _bin(p: float) -> int:
    return min(BINS - 1, max(0, int(p * BINS)))


@dataclass(frozen=True)
class Observation:
    """One row's pre-update prediction against its label, as plain floats.

    ``nll`` is -log p(y) under the predictive. ``pit`` holds one (F(y-), F(y)) interval per output
    (gaussian, poisson). ``z`` holds standardised residuals (gaussian). ``probs`` and ``label`` are
    the predictive class probabilities and the observed class (bernoulli: ``probs`` = [P(y = 1)],
    label 0 or 1).
    """

    nll: float
    pit: Sequence[tuple[float, float]] = ()
    z: Sequence[float] = ()
    probs: Sequence[float] = ()
    label: int | None = None
    mark: Mark | None = None  # how much the row moved the model (service.influence)


@dataclass
class Stats:
    """Additive sufficient statistics of a set of observations (``+`` merges two sets)."""

    n: int = 0
    nll_sum: float = 0.0
    outputs: int = 0  # scalar outputs with a PIT interval
    covered: list[float] = field(default_factory=lambda: [0.0] * len(LEVELS))
    pit: list[float] = field(default_factory=lambda: [0.0] * BINS)
    z_n: int = 0
    z_sum: float = 0.0
    z_sq: float = 0.0
    labels: int = 0  # rows with class probabilities
    brier_sum: float = 0.0
    log_loss_sum: float = 0.0
    rel_n: list[int] = field(default_factory=lambda: [0] * BINS)
    rel_conf: list[float] = field(default_factory=lambda: [0.0] * BINS)
    rel_hit: list[float] = field(default_factory=lambda: [0.0] * BINS)

    def add(self, obs: Observation) -> None:
        self.n += 1
        self.nll_sum += obs.nll
        for lo, hi in obs.pit:
            self.outputs += 1
            for i, level in enumerate(LEVELS):
                self.covered[i] += _overlap(lo, hi, 0.5 - level / 2, 0.5 + level / 2)
            if hi - lo <= 1e-12:
                self.pit[_bin(lo)] += 1.0
            else:
                for b in range(_bin(lo), _bin(hi) + 1):
                    self.pit[b] += _overlap(lo, hi, b / BINS, (b + 1) / BINS)
        for z in obs.z:
            self.z_n += 1
            self.z_sum += z
            self.z_sq += z * z
        if obs.probs and obs.label is not None:
            self.labels += 1
            self.log_loss_sum += obs.nll
            if len(obs.probs) == 1:  # bernoulli: the positive class
                p, y = obs.probs[0], float(obs.label)
                self.brier_sum += (p - y) ** 2
                b = _bin(p)
                self.rel_conf[b] += p
                self.rel_hit[b] += y
            else:  # categorical: the top label
                self.brier_sum += sum(
                    (p - (1.0 if k == obs.label else 0.0)) ** 2 for k, p in enumerate(obs.probs)
                )
                top = max(range(len(obs.probs)), key=obs.probs.__getitem__)
                conf = obs.probs[top]
                b = _bin(conf)
                self.rel_conf[b] += conf
                self.rel_hit[b] += 1.0 if top == obs.label else 0.0
            self.rel_n[b] += 1

    def __add__(self, other: Stats) -> Stats:
        return Stats(
            n=self.n + other.n,
            nll_sum=self.nll_sum + other.nll_sum,
            outputs=self.outputs + other.outputs,
            covered=[a + b for a, b in zip(self.covered, other.covered, strict=True)],
            pit=[a + b for a, b in zip(self.pit, other.pit, strict=True)],
            z_n=self.z_n + other.z_n,
            z_sum=self.z_sum + other.z_sum,
            z_sq=self.z_sq + other.z_sq,
            labels=self.labels + other.labels,
            brier_sum=self.brier_sum + other.brier_sum,
            log_loss_sum=self.log_loss_sum + other.log_loss_sum,
            rel_n=[a + b for a, b in zip(self.rel_n, other.rel_n, strict=True)],
            rel_conf=[a + b for a, b in zip(self.rel_conf, other.rel_conf, strict=True)],
            rel_hit=[a + b for a, b in zip(self.rel_hit, other.rel_hit, strict=True)],
        )

    # -- summaries (None where the window holds nothing to measure) ---------------------------

    @property
    def nll(self) -> float | None:
        return self.nll_sum / self.n if self.n else None

    @property
    def coverage(self) -> dict[float, float] | None:
        if not self.outputs:
            return None
        return {lv: c / self.outputs for lv, c in zip(LEVELS, self.covered, strict=True)}

    @property
    def pit_histogram(self) -> list[float] | None:
        """The share of PIT mass in each of the ``BINS`` bins (sums to 1)."""
        return [c / self.outputs for c in self.pit] if self.outputs else None

    @property
    def residual_mean(self) -> float | None:
        return self.z_sum / self.z_n if self.z_n else None

    @property
    def residual_variance(self) -> float | None:
        if not self.z_n:
            return None
        mean = self.z_sum / self.z_n
        return max(0.0, self.z_sq / self.z_n - mean * mean)

    @property
    def brier(self) -> float | None:
        return self.brier_sum / self.labels if self.labels else None

    @property
    def log_loss(self) -> float | None:
        return self.log_loss_sum / self.labels if self.labels else None

    @property
    def ece(self) -> float | None:
        if not self.labels:
            return None
        return (
            sum(abs(h - c) for h, c in zip(self.rel_hit, self.rel_conf, strict=True)) / self.labels
        )

    def reliability(self) -> list[dict[str, float | int | None]]:
        """Per bin: its edges, its count, the mean confidence and the observed accuracy."""
        return [
            {
                "lower": b / BINS,
                "upper": (b + 1) / BINS,
                "count": n,
                "confidence": self.rel_conf[b] / n if n else None,
                "accuracy": self.rel_hit[b] / n if n else None,
            }
            for b, n in enumerate(self.rel_n)
        ]

    def summary(self) -> dict[str, Any]:
        """The scalar figures, JSON-ready (absent figures are null)."""
        cov = self.coverage
        return {
            "observations": self.n,
            "nll": self.nll,
            "coverage": {str(lv): v for lv, v in cov.items()} if cov else None,
            "residual_mean": self.residual_mean,
            "residual_variance": self.residual_variance,
            "brier": self.brier,
            "log_loss": self.log_loss,
            "ece": self.ece,
        }

    def to_dict(self) -> dict[str, Any]:
        """The statistics as plain values, copied: a snapshot takes this with its state and
        encodes it later, while later rows go on adding to this bucket's lists."""
        return {k: _copied(getattr(self, k)) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        return cls(**{k: _copied(d[k]) for k in cls.__dataclass_fields__})


def _copied(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


class CalibrationTracker:
    """A sliding window over the last ``window`` observations, in ``buckets`` buckets.

    The window sums the closed buckets and the open one, so it holds between
    ``window - window // buckets`` and ``window`` observations once full. Closed buckets are also
    kept, with the model version at which each closed, in a bounded ``history`` (coverage over
    time, for reports). Memory: O(buckets + history) small objects, whatever the traffic.
    """

    def __init__(self, window: int = 1000, buckets: int = 10, history: int = 200) -> None:
        if window < buckets or buckets < 1:
            raise ValueError(f"window ({window}) must be at least buckets ({buckets}) >= 1")
        self.window, self.buckets = window, buckets
        self.bucket_size = window // buckets
        self._closed: deque[Stats] = deque(maxlen=buckets - 1)
        self._open = Stats()
        self.history: deque[tuple[int, Stats]] = deque(maxlen=history)

    def observe(self, obs: Observation, version: int) -> None:
        """Add one observation; ``version`` is the model version after it."""
        self._open.add(obs)
        if self._open.n >= self.bucket_size:
            if self.buckets > 1:
                self._closed.append(self._open)
            self.history.append((version, self._open))
            self._open = Stats()

    def stats(self) -> Stats:
        """The current window's statistics (a fresh object; the tracker is not shared)."""
        total = Stats() + self._open
        for s in self._closed:
            total = total + s
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "buckets": self.buckets,
            "closed": [s.to_dict() for s in self._closed],
            "open": self._open.to_dict(),
            "history": [[v, s.to_dict()] for v, s in self.history],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], history: int = 200) -> CalibrationTracker:
        t = cls(int(d["window"]), int(d["buckets"]), history)
        t._closed.extend(Stats.from_dict(s) for s in d["closed"])
        t._open = Stats.from_dict(d["open"])
        t.history.extend((int(v), Stats.from_dict(s)) for v, s in d["history"])
        return t
