"""Snapshots: on demand, after ``snapshot_every`` observations, and from their own ticker.

A snapshot stores the published (version, state) pair with the calibration window it belongs to
(taken together, so the two always match); the store then trims the log up to it. The ticker
snapshots every model with observations newer than its snapshot once ``snapshot_interval_s``
has passed since the last one.
"""

from __future__ import annotations

import asyncio
import logging
import time

from service.components.build import encode_state
from service.config import Settings
from service.errors import NotOwner
from service.hosting.catalogue import Catalogue
from service.hosting.compute import Compute
from service.hosting.hosted import HostedModel
from service.hosting.recovery import Recovery
from service.store import Lease, Snapshot, Store

__all__ = ["Snapshots"]

log = logging.getLogger("postserve.hosting")


class Snapshots:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        lease: Lease,
        catalogue: Catalogue,
        compute: Compute,
        recovery: Recovery,
    ) -> None:
        self.settings, self.store, self.lease = settings, store, lease
        self.catalogue, self.compute, self.recovery = catalogue, compute, recovery
        self._tasks: set[asyncio.Task[None]] = set()

    async def now(self, h: HostedModel) -> int:
        """Snapshot ``h`` at the store's latest (resyncing first if newly its writer or a write
        failed); the bytes written."""
        async with h.lock:
            if await self.lease.acquire(h.name) or h.stale:
                await self.recovery.resync(h)
        return await self.take(h)

    async def take(self, h: HostedModel) -> int:
        """Store a snapshot of what ``h`` publishes now; the bytes written."""
        current = h.current
        extra = {"calibration": h.calibration.to_dict()}  # taken with the state it belongs to
        tensors, meta = await self.compute.offload(
            encode_state, current.state, current.version, h.spec.filter.type, extra
        )
        if not h.deleted:
            await self.store.put_snapshot(h.name, Snapshot(current.version, tensors, meta))
            h.snapshot_version = max(h.snapshot_version, current.version)
            h.snapshot_time = time.monotonic()
        return len(tensors) + len(meta)

    def due(self, h: HostedModel) -> bool:
        """Enough observations since the last snapshot to take one now."""
        return h.version - h.snapshot_version >= self.settings.snapshot_every

    def spawn(self, h: HostedModel) -> None:
        """Take a snapshot of ``h`` in the background (at most one at a time per model)."""
        if h.snapshotting:
            return
        h.snapshotting = True

        async def run() -> None:
            try:
                await self.take(h)
            except NotOwner:
                log.debug("skipped the snapshot of %s: another replica writes it", h.name)
            except Exception:
                log.exception("snapshot of %s failed", h.name)
            finally:
                h.snapshotting = False

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def tick(self) -> None:
        """Forever: snapshot what has waited ``snapshot_interval_s``, checking every
        ``min(snapshot_interval_s, 5)`` seconds."""
        period = self.settings.snapshot_interval_s
        while True:
            await asyncio.sleep(min(period, 5.0))
            now = time.monotonic()
            for h in self.catalogue.all():
                if h.version > h.snapshot_version and now - h.snapshot_time >= period:
                    self.spawn(h)

    async def drain(self) -> None:
        """Wait for the background snapshots, then snapshot every model with newer
        observations (a clean stop leaves nothing to replay)."""
        for task in list(self._tasks):
            try:
                await task
            except Exception:  # logged by the task itself
                continue
        for h in self.catalogue.all():
            if h.version > h.snapshot_version:
                try:
                    await self.take(h)
                except NotOwner:
                    pass
                except Exception:
                    log.exception("final snapshot of %s failed", h.name)
