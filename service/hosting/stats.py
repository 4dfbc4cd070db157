"""What the engine tells its observers: an explicit snapshot of counters and per-model figures.

:mod:`service.metrics` renders these at scrape time; it never reads hosted models directly.
Calibration figures are computed for monitored models only (the ones with Prometheus series).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from service.calibration import Stats
from service.errors import (
    InvalidInput,
    NotFound,
    NotOwner,
    StepRejected,
    StoreUnavailable,
    TooLarge,
    VersionConflict,
)
from service.hosting.hosted import Counters, HostedModel

__all__ = ["REFUSALS", "EngineStats", "ModelStats", "collect"]

#: The error codes an update can be refused with: every one is reported from the start, at 0
#: until it happens, so that dashboards and alerts see a series rather than no data.
REFUSALS: tuple[str, ...] = tuple(
    e.code
    for e in (
        InvalidInput,
        TooLarge,
        StepRejected,
        StoreUnavailable,
        NotOwner,
        VersionConflict,
        NotFound,
    )
)


def _refusals(counts: dict[str, int]) -> dict[str, int]:
    return {**dict.fromkeys(REFUSALS, 0), **counts}


@dataclass(frozen=True)
class ModelStats:
    name: str
    likelihood: str
    filter: str
    monitored: bool
    version: int
    snapshot_version: int
    snapshot_age_s: float  # seconds since the last snapshot (or since hosting, if none)
    state_bytes: int
    applied: int  # observations applied by this process since it started
    rejected: dict[str, int]  # update requests refused, by error code
    calibration: Stats | None  # the window's figures; None unless monitored
    influence: tuple[list[int], float] | None = None  # sizes: counts per bucket, sum; monitored

    @property
    def unsnapshotted(self) -> int:
        """Observations after the latest snapshot (what a restart replays)."""
        return self.version - self.snapshot_version


@dataclass(frozen=True)
class EngineStats:
    ready: bool
    applied: int  # observations applied, all models, since start
    rejected: dict[str, int]  # update requests refused, by error code, all models
    models: list[ModelStats]  # sorted by name
    batched_steps: int = 0  # cross-model batched steps run (POSTSERVE_BATCH_STEPS)
    batched_rows: int = 0  # rows they stepped

    @property
    def monitored(self) -> list[ModelStats]:
        return [m for m in self.models if m.monitored]


def _model(h: HostedModel, now: float) -> ModelStats:
    current = h.current
    return ModelStats(
        name=h.name,
        likelihood=h.spec.likelihood.type,
        filter=h.spec.filter.type,
        monitored=h.spec.monitor,
        version=current.version,
        snapshot_version=h.snapshot_version,
        snapshot_age_s=now - h.snapshot_time,
        state_bytes=h.filter.state_bytes(current.state),
        applied=h.applied,
        rejected=_refusals(dict(h.rejected)),
        calibration=h.calibration.stats() if h.spec.monitor else None,
        influence=(list(h.influence.counts), h.influence.total) if h.spec.monitor else None,
    )


def collect(
    ready: bool, counters: Counters, models: list[HostedModel], batched: tuple[int, int] = (0, 0)
) -> EngineStats:
    """The snapshot; ``batched``: (batched steps, rows they stepped)."""
    now = time.monotonic()
    return EngineStats(
        ready=ready,
        applied=counters.applied,
        rejected=_refusals(dict(counters.rejected)),
        models=sorted((_model(h, now) for h in models), key=lambda m: m.name),
        batched_steps=batched[0],
        batched_rows=batched[1],
    )
