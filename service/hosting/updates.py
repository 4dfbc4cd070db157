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

``apply_keyed`` is the same protocol for rows that each answer a request of their own (a batch of
rewards, one request id per event): the rows whose id has no answer yet are one log entry, and
each of their answers (the version after its row, its predictive and log density: what it
would have answered alone) is written with it in the same atomic append; a row whose id has an
answer already, or repeats an earlier row's id, is not applied and gets that answer with
``duplicate: true``. So each row is applied at most once, and a batch changes the model exactly
as its new rows applied one at a time, in order, would.

Every refusal is counted here (:class:`~service.hosting.hosted.Counters`), by error code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from service.calibration import Observation
from service.components import Label
from service.config import Settings
from service.errors import InvalidInput, NotFound, NotReady, PostserveError
from service.filters import Belief
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

T = TypeVar("T")


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
        return await self._counted(h, self._apply(h, entry))

    async def apply_keyed(
        self, h: HostedModel, x: list[list[float]], y: list[Label], request_ids: Sequence[str]
    ) -> list[UpdateResponse]:
        """Apply rows ``x``, ``y``, row i answering ``request_ids[i]`` (see the module's
        docstring); one answer per row, in order; refusals are counted."""
        return await self._counted(h, self._apply_keyed(h, x, y, request_ids))

    async def _counted(self, h: HostedModel, work: Awaitable[T]) -> T:
        try:
            return await work
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

    def _admit(self, h: HostedModel, x: list[list[float]], y: Sequence[Label], what: str) -> None:
        self.limits.rows(x, h.filter.network.input_dim, what)
        if len(y) != len(x):
            raise InvalidInput(f"x has {len(x)} rows but y has {len(y)}")

    @asynccontextmanager
    async def _writing(self, h: HostedModel) -> AsyncIterator[None]:
        """Under the model's lock, as its writer, caught up with what other replicas wrote."""
        async with h.lock:
            if h.deleted:
                raise NotFound(f"no model named {h.name!r}")
            if await self.lease.acquire(h.name):  # newly the writer: catch up with the log first
                await self.recovery.catch_up(h)
            yield

    async def _apply(self, h: HostedModel, entry: LogEntry) -> UpdateResponse:
        self._admit(h, entry.x, entry.y, "update")
        n = len(entry.x)
        async with self._writing(h):
            if entry.request_id is not None:
                first = await self.store.get_response(h.name, entry.request_id)
                if first is not None:
                    return _duplicate(first)
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
            self._publish(h, version, n, new, obs)
        if self.snapshots.due(h):
            self.snapshots.spawn(h)
        return response

    async def _apply_keyed(
        self, h: HostedModel, x: list[list[float]], y: list[Label], request_ids: Sequence[str]
    ) -> list[UpdateResponse]:
        self._admit(h, x, y, "reward")
        done: dict[int, UpdateResponse] = {}
        async with self._writing(h):
            firsts = await self.store.get_responses(h.name, request_ids)
            fresh: dict[str, int] = {}  # request id -> its row, for the rows to apply
            for i, (rid, first) in enumerate(zip(request_ids, firsts, strict=True)):
                if first is not None:
                    done[i] = _duplicate(first)
                elif rid not in fresh:
                    fresh[rid] = i
            if fresh:
                rows = list(fresh.values())
                each = await self._commit_keyed(
                    h, [x[i] for i in rows], [y[i] for i in rows], list(fresh)
                )
                done.update(zip(rows, each, strict=True))
        for i, rid in enumerate(request_ids):  # a repeat within the batch: its first row's answer
            if i not in done:
                done[i] = done[fresh[rid]].model_copy(update={"duplicate": True})
        if self.snapshots.due(h):
            self.snapshots.spawn(h)
        return [done[i] for i in range(len(request_ids))]

    async def _commit_keyed(
        self, h: HostedModel, x: list[list[float]], y: list[Label], ids: Sequence[str]
    ) -> list[UpdateResponse]:
        """Compute, append (one record, one request record per row) and publish new rows."""
        entry = LogEntry(x, y, None)
        version, state = h.current.version, h.current.state
        work = h.filter.state_bytes(state) * len(x)
        new, infos, obs = await self.compute.run(work, h.step, state, entry.x, entry.y)
        each = [answers.update(version + k + 1, [info]) for k, info in enumerate(infos)]
        records = [(rid, a.model_dump_json().encode()) for rid, a in zip(ids, each, strict=True)]
        await self.store.append(h.name, version + len(x), entry.to_bytes(), requests=records)
        self._publish(h, version, len(x), new, obs)
        return each

    def _publish(
        self, h: HostedModel, version: int, n: int, new: Belief, obs: list[Observation]
    ) -> None:
        h.publish(version + n, new)
        h.score(version, obs)  # with the publish: snapshots see both or neither
        self.counters.note_applied(h, n)


def _duplicate(first: bytes) -> UpdateResponse:
    return UpdateResponse.model_validate_json(first).model_copy(update={"duplicate": True})
