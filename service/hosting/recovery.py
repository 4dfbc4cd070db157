"""Bringing a hosted model up to the store's latest: a newer snapshot, then the log after it.

Runs at start (every model in the catalogue), when this replica newly takes a model's write
lease (another replica may have written it meanwhile), and after a write of the model failed
(``resync``: the store may hold a record whose answer was lost, or a newer writer's). Replaying a
log record repeats the same deterministic steps, through the compiled step that computed it if
one did (``kernels``), so the state comes back bit for bit on the same device and dtype; the calibration window travels in the snapshot's metadata and the replay
refills the rest.
"""

from __future__ import annotations

import json

from service.calibration import CalibrationTracker
from service.components.build import decode_state
from service.hosting.compute import Compute
from service.hosting.hosted import HostedModel
from service.hosting.kernels import Kernels
from service.hosting.records import LogEntry
from service.store import Store

__all__ = ["Recovery"]


class Recovery:
    def __init__(self, store: Store, compute: Compute, kernels: Kernels) -> None:
        self.store, self.compute, self.kernels = store, compute, kernels

    async def resync(self, h: HostedModel) -> None:
        """Settle ``h``'s pending updates (each published if durable, dropped if not), then
        catch up with the store; the caller holds ``h.lock``. ``h.stale`` stays set until the
        catch-up succeeds."""
        h.stale = True
        await h.settle()
        await self.catch_up(h)
        h.stale = False

    async def catch_up(self, h: HostedModel) -> None:
        """Apply what the store has beyond ``h.version``; the caller holds ``h.lock`` and no
        update is pending (or ``h`` is not published yet)."""
        snap = await self.store.get_snapshot(h.name)
        if snap is not None and snap.version > h.version:
            meta = json.loads(snap.meta)
            h.publish(
                snap.version, decode_state(snap.tensors, meta["algorithm"], h.dtype, h.device)
            )
            h.snapshot_version = snap.version
            if "calibration" in meta:
                h.calibration = CalibrationTracker.from_dict(meta["calibration"])
        for rec in await self.store.read_log(h.name, after=h.version):
            entry = LogEntry.from_bytes(rec.record)
            version, state = h.current.version, h.current.state
            if version + len(entry.x) != rec.version:
                raise RuntimeError(
                    f"log of {h.name!r} is inconsistent: record {rec.version} follows {version}"
                )
            kernel = await self.kernels.for_replay(h, entry.kernel)  # the one that computed it
            new, _, obs = await self.compute.offload(
                h.step, state, entry.x, entry.y, kernel, entry.outputs
            )
            h.publish(rec.version, new)
            h.score(version, obs, () if entry.request_id is None else (entry.request_id,))
