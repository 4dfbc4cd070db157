"""One hosted model, and the counters of what was applied and refused.

A hosted model holds its spec, its filter and a *published* pair (version, state): the pair is
replaced whole, never mutated, so a reader that takes ``hosted.current`` once sees a consistent
version and state without a lock. Writers (updates, catch-up) are serialised by ``lock``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic

import torch

from service.calibration import CalibrationTracker, Observation
from service.components import Label
from service.components.registry import Scorer
from service.errors import InvalidInput
from service.filters import Belief, OnlineFilter, StepInfo
from service.filters.algorithm import S
from service.filters.linalg import all_finite
from service.schemas import ModelSpec

__all__ = ["Counters", "Hosted", "HostedModel", "Published"]


@dataclass(frozen=True)
class Published(Generic[S]):
    """The belief after ``version`` observations."""

    version: int
    state: S


@dataclass
class Hosted(Generic[S]):
    """One hosted model. ``current`` is replaced whole by ``publish``, never mutated."""

    spec: ModelSpec
    filter: OnlineFilter[S]
    device: torch.device
    dtype: torch.dtype
    current: Published[S]
    calibration: CalibrationTracker
    scorer: Scorer  # the likelihood kind's calibration extractor
    snapshot_version: int = 0
    snapshot_time: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    snapshotting: bool = False
    deleted: bool = False
    applied: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        return self.current.version

    def publish(self, version: int, state: S) -> None:
        self.current = Published(version, state)

    def tensor(self, rows: Sequence[object], what: str = "x") -> torch.Tensor:
        """Request rows as a tensor of the model's dtype, on its device.

        The HTTP edge admits finite numbers only, so a value that is not finite here overflowed
        the dtype: InvalidInput says so, naming the range."""
        t = torch.tensor(rows, dtype=self.dtype, device=self.device)
        if not all_finite(t):
            big = torch.finfo(self.dtype).max
            raise InvalidInput(
                f"{what} holds values outside the model's {self.spec.dtype} range (magnitudes "
                f'up to {big:.3g}); scale the inputs or create the model with "dtype": "float64"'
            )
        return t

    def step(
        self, state: S, x: list[list[float]], y: Sequence[Label]
    ) -> tuple[S, list[StepInfo], list[Observation]]:
        """One filtering step per row from ``state`` (pure): the new state, each row's report,
        and what calibration scores of each row. Raises StepRejected / InvalidInput."""
        X = self.tensor(x)
        try:
            Y = self.tensor(y, "y")
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"y rows must all have the same shape: {exc}") from exc
        new, infos = self.filter.run(state, X, Y)
        return new, infos, self.scorer(self.filter.likelihood, infos, y)

    def score(self, version: int, observations: list[Observation]) -> None:
        """Add the observations applied after ``version`` to the calibration window."""
        for i, o in enumerate(observations, start=1):
            self.calibration.observe(o, version + i)


#: A hosted model of whichever algorithm: the hosting layer knows only that its state is a belief.
HostedModel = Hosted[Belief]


@dataclass
class Counters:
    """Observations applied and update requests refused (by error code), over all models since
    start; the per-model figures live on each :class:`Hosted`. The one place that counts."""

    applied: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def note_applied(self, h: Hosted[S], rows: int) -> None:
        h.applied += rows
        self.applied += rows

    def note_rejected(self, h: Hosted[S] | None, code: str) -> None:
        self.rejected[code] += 1
        if h is not None:
            h.rejected[code] += 1
