"""The engine: a thin facade with one method per API operation over the hosting services.

=============  ===============================================================================
module         concern
=============  ===============================================================================
catalogue      the hosted models by name; create, delete, restore at start
recovery       catch-up: a newer snapshot, then a replay of the log after it
updates        the write-ahead update pipeline (``/update`` and rewards); refusal counters
predictions    ``/predict`` on the published state
bandits        ``/decide``, ``/reward``, their batches, default rewards of expired events
snapshots      snapshots on demand, every N observations and from their own ticker
kernels        compiled steps, built in the background; the one a log record names, for replay
answers        domain results -> response models
stats          the counters and per-model figures that metrics read
=============  ===============================================================================

No service re-enters another's public entry point: a reward goes to the update pipeline's
``apply``, never back through :meth:`Engine.update`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import logging

import torch

from service.config import Settings
from service.errors import StoreUnavailable
from service.hosting import answers
from service.hosting.bandits import Bandits
from service.hosting.batching import Coalescer
from service.hosting.catalogue import Catalogue
from service.hosting.compute import Compute
from service.hosting.kernels import Kernels
from service.hosting.limits import Limits, input_rows
from service.hosting.predictions import Predictions
from service.hosting.records import LogEntry
from service.hosting.recovery import Recovery
from service.hosting.snapshots import Snapshots
from service.hosting.stats import EngineStats, collect
from service.hosting.updates import Updates
from service.schemas import (
    CalibrationResponse,
    DecideBatchRequest,
    DecideRequest,
    InfluenceResponse,
    ModelInfo,
    ModelList,
    ModelSpec,
    PredictRequest,
    PredictResponse,
    RewardBatchRequest,
    RewardRequest,
    RewardResponse,
    SnapshotResponse,
    UpdateRequest,
    UpdateResponse,
)
from service.store import Backend

__all__ = ["Engine"]

log = logging.getLogger("postserve.engine")


class Engine:
    """Owns the hosted models; every public method is one API operation."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.store, self.lease = backend.store, backend.lease
        limits = Limits(settings)
        compute = Compute(settings.compute_threads)
        self.kernels = Kernels(settings)
        recovery = Recovery(self.store, compute, self.kernels)
        self.catalogue = Catalogue(
            settings, self.store, limits, compute, recovery, self.kernels, shared=self.lease.shared
        )
        self.snapshots = Snapshots(
            settings, self.store, self.lease, self.catalogue, compute, recovery
        )
        self.coalescer = (
            Coalescer(settings, compute, self.kernels) if settings.batch_steps else None
        )
        self.updates = Updates(
            settings, self.store, self.lease, self.catalogue, limits, compute, recovery,
            self.snapshots, self.coalescer,
        )  # fmt: skip
        self.predictions = Predictions(limits, compute, self.catalogue.kernels)
        self.bandits = Bandits(settings, self.store, self.catalogue, limits, compute, self.updates)
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.catalogue.ready

    async def start(self) -> None:
        """Open the store; restore every model in the background, then become ready."""
        torch.set_num_threads(self.settings.threads)
        await self.store.open()
        self._tasks.append(asyncio.create_task(self._restore_then_tick()))

    async def _restore_then_tick(self) -> None:
        """Restore every model, retrying while the store is unreachable; then the tickers."""
        while True:
            try:
                await self.catalogue.restore()
                break
            except StoreUnavailable as exc:
                log.warning("restore waits for the store: %s", exc)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("restoring the models failed; retrying in 5 s")
                await asyncio.sleep(5.0)
        self.catalogue.ready = True
        # What exists now (the interpreter's, torch's and the restored models' objects) lives
        # as long as the process: out of the cyclic collector's scans, which otherwise walk it
        # all on each full collection, most of a small batch's time (docs/architecture.md 2).
        gc.freeze()
        self._tasks.append(asyncio.create_task(self.bandits.tick()))
        await self.snapshots.tick()

    async def stop(self) -> None:
        self.catalogue.ready = False
        gc.unfreeze()  # what this engine held can be collected again
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.kernels.stop()
        if self.coalescer is not None:
            await self.coalescer.stop()
        await self.snapshots.drain()
        await self.store.close()

    async def readiness(self) -> tuple[bool, bool]:
        """(every model restored, the store answers)."""
        return self.ready, await self.store.ping()

    def stats(self) -> EngineStats:
        """Counters and per-model figures, for metrics."""
        c = self.coalescer
        batched = (0, 0) if c is None else (c.batches, c.rows)
        return collect(self.ready, self.updates.counters, self.catalogue.all(), batched)

    # -- catalogue ---------------------------------------------------------------------------

    async def create(self, spec: ModelSpec) -> ModelInfo:
        return answers.model_info(await self.catalogue.create(spec))

    async def info(self, name: str) -> ModelInfo:
        return answers.model_info(await self.catalogue.fetch(name))

    def list_models(self, limit: int | None = None, after: str | None = None) -> ModelList:
        """The models by name: all of them, or the first ``limit`` after ``after`` (a page)
        with the name to continue after, if there are more."""
        names = self.catalogue.names()
        start = 0 if after is None else bisect.bisect_right(names, after)
        end = len(names) if limit is None else min(len(names), start + limit)
        models = [answers.model_info(self.catalogue.get(n)) for n in names[start:end]]
        more = end < len(names) and limit is not None
        return ModelList(models=models, next_after=names[end - 1] if more and models else None)

    async def delete(self, name: str) -> None:
        await self.catalogue.delete(name)

    async def calibration(self, name: str) -> CalibrationResponse:
        return answers.calibration(await self.catalogue.fetch(name))

    async def influence(self, name: str, top: int) -> InfluenceResponse:
        """The ``top`` most influential rows of the model's recent window, largest first."""
        return await self.predictions.influence(await self.catalogue.fetch(name), top)

    # -- data plane --------------------------------------------------------------------------

    async def update(self, name: str, req: UpdateRequest) -> UpdateResponse:
        return UpdateResponse.model_validate_json(await self.update_json(name, req))

    async def update_json(self, name: str, req: UpdateRequest) -> bytes:
        """``update``'s answer as JSON (for the HTTP route: encoded once, by orjson)."""
        h = await self.updates.hosted(name)
        x = self.updates.counted_now(h, input_rows, h.filter.network, req.x, req.dt, len(req.y))
        entry = LogEntry(x, list(req.y), req.request_id, outputs=req.outputs)
        return await self.updates.apply_json(h, entry)

    def refused(self, name: str, code: str) -> None:
        """Count an update refused at the HTTP edge (its body did not validate)."""
        self.updates.refused(name, code)

    async def predict(self, name: str, req: PredictRequest) -> PredictResponse:
        return await self.predictions.predict(await self.catalogue.fetch(name), req)

    async def predict_json(self, name: str, req: PredictRequest) -> bytes:
        """``predict``'s answer as JSON bytes (what the HTTP route sends)."""
        return await self.predictions.predict_json(await self.catalogue.fetch(name), req)

    async def decide_json(self, name: str, req: DecideRequest) -> bytes:
        """``/decide``'s answer (a ``DecideResponse``) as JSON bytes."""
        return await self.bandits.decide(await self.catalogue.fetch(name), req)

    async def reward(self, name: str, req: RewardRequest) -> RewardResponse:
        return await self.bandits.reward(await self.catalogue.fetch(name), req)

    async def decide_batch_json(self, name: str, req: DecideBatchRequest) -> bytes:
        """``/decide/batch``'s answer (a ``DecideBatchResponse``) as JSON bytes."""
        return await self.bandits.decide_batch(await self.catalogue.fetch(name), req)

    async def reward_batch_json(self, name: str, req: RewardBatchRequest) -> bytes:
        """``/reward/batch``'s answer (a ``RewardBatchResponse``) as JSON bytes."""
        return await self.bandits.reward_batch(await self.catalogue.fetch(name), req)

    async def snapshot(self, name: str) -> SnapshotResponse:
        h = await self.catalogue.fetch(name)
        size = await self.snapshots.now(h)
        return SnapshotResponse(name=name, version=h.snapshot_version, bytes=size)
