"""The update pipeline: the write-ahead protocol of ``/update`` and of rewards.

For one request (``docs/architecture.md`` section 2):

1. check the rows against the model and the limits, before anything changes;
2. under the model's lock: make sure this process may write it (catching up first if it newly
   may), answer a repeated ``request_id`` with its first answer;
3. compute the new state, not yet visible; a non-finite or non-PSD result raises StepRejected
   and nothing changes;
4. append the log record (with the answer, for ``request_id``) to the store; if that fails,
   StoreUnavailable and the old state stays;
5. publish (version + rows, new state) with the rows' calibration scores, and answer.

Every refusal is counted here (:class:`~service.hosting.hosted.Counters`), by error code.
"""

from __future__ import annotations

from service.config import Settings
from service.errors import InvalidInput, NotFound, NotReady, PostserveError
from service.hosting import answers
from service.hosting.catalogue import Catalogue
from service.hosting.compute import Compute
from service.hosting.hosted import Counters, HostedModel
from service.hosting.limits import Limits
from service.hosting.records import LogEntry
from service.hosting.recovery import Recovery
from service.hosting.snapshots import Snapshots
from service.schemas import UpdateResponse
from service.store import Lease, Store

__all__ = ["Updates"]


class Updates:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        lease: Lease,
        catalogue: Catalogue,
        limits: Limits,
        compute: Compute,
        recovery: Recovery,
        snapshots: Snapshots,
    ) -> None:
        self.settings, self.store, self.lease = settings, store, lease
        self.catalogue, self.limits, self.compute = catalogue, limits, compute
        self.recovery, self.snapshots = recovery, snapshots
        self.counters = Counters()

    def refused(self, name: str, code: str) -> None:
        """Count an update of ``name`` refused with error ``code`` before it got here (the
        HTTP edge's body validation)."""
        self.counters.note_rejected(self.catalogue.find(name), code)

    async def apply(self, h: HostedModel, entry: LogEntry) -> UpdateResponse:
        """Apply one log entry to ``h`` by the protocol above; refusals are counted."""
        try:
            return await self._apply(h, entry)
        except PostserveError as exc:
            if not isinstance(exc, NotReady):
                self.counters.note_rejected(h, exc.code)
            raise

    async def apply_to(self, name: str, entry: LogEntry) -> UpdateResponse:
        """``apply`` to the model called ``name`` (an unknown name is counted as refused)."""
        try:
            h = self.catalogue.get(name)
        except NotFound as exc:
            self.counters.note_rejected(None, exc.code)
            raise
        return await self.apply(h, entry)

    async def _apply(self, h: HostedModel, entry: LogEntry) -> UpdateResponse:
        self.limits.rows(entry.x, h.filter.network.input_dim, "update")
        if len(entry.y) != len(entry.x):
            raise InvalidInput(f"x has {len(entry.x)} rows but y has {len(entry.y)}")
        n = len(entry.x)
        async with h.lock:
            if h.deleted:
                raise NotFound(f"no model named {h.name!r}")
            if await self.lease.acquire(h.name):  # newly the writer: catch up with the log first
                await self.recovery.catch_up(h)
            if entry.request_id is not None:
                first = await self.store.get_response(h.name, entry.request_id)
                if first is not None:
                    return UpdateResponse.model_validate_json(first).model_copy(
                        update={"duplicate": True}
                    )
            version, state = h.current.version, h.current.state
            work = h.filter.state_bytes(state) * n
            new, infos, obs = await self.compute.run(work, h.step, state, entry.x, entry.y)
            response = answers.update(version + n, infos)
            await self.store.append(
                h.name,
                version + n,
                entry.to_bytes(),
                entry.request_id,
                response.model_dump_json().encode() if entry.request_id is not None else None,
            )
            h.publish(version + n, new)
            h.score(version, obs)  # with the publish: snapshots see both or neither
            self.counters.note_applied(h, n)
        if self.snapshots.due(h):
            self.snapshots.spawn(h)
        return response
