"""The update pipeline: the write-ahead protocol of ``/update`` and of rewards.

For one request (``docs/architecture.md`` section 2):

1. check the rows against the model and the limits, before anything changes;
2. under the model's lock: make sure this process may write it; if it newly may, or a write of
   the model failed, or the ``request_id`` is pending, settle the pending updates and catch up
   with the store first; answer a repeated ``request_id`` with its first answer;
3. compute the new state from the *tip* (the latest pending update, else the published state),
   not yet visible; a non-finite or non-PSD result raises StepRejected and nothing changes;
4. hand the log record (with the answer, for ``request_id``) to the store, following the tip's
   version (``after``), and make it the new tip; release the lock;
5. wait for the commit that holds the record; once durable it is published in version order
   with the rows' calibration scores (``Hosted.pend``), and the request is answered. If it
   fails, nothing is published, the pending updates after it fail with it, and the next writer
   resyncs the model with the store first.

Updates of one model are computed one at a time, but wait for durability together: the store
commits what arrives while its previous commit is in flight in one go (group commit).

``apply_keyed`` is the same protocol, through the same pending chain (computed from the tip,
published in version order once its commit is durable), for rows that each answer a request of
their own (a batch of rewards, one request id per event): it resyncs first if one of the ids is
pending, and the rows whose id has no answer yet are one log entry (one pending update), and
each of their answers (the version after its row, its predictive and log density: what it
would have answered alone) is written with it in the same atomic append; a row whose id has an
answer already, or repeats an earlier row's id, is not applied and gets that answer with
``duplicate: true``. So each row is applied at most once, and a batch changes the model exactly
as its new rows applied one at a time, in order, would (bit for bit, but for the Kalman filter
with static dynamics, whose rows are one block update, the same to rounding:
``docs/algorithms.md`` 3.7).

Every refusal is counted here (:class:`~service.hosting.hosted.Counters`), by error code.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar, TypeVarTuple

import orjson

from service.calibration import Observation
from service.components import Label
from service.config import Settings
from service.errors import InvalidInput, NotFound, NotReady, PostserveError
from service.filters import Belief, RowReport
from service.filters.batched import batchable
from service.filters.compiled import OutputKernels, RowKernel
from service.filters.outputs import check_outputs
from service.hosting import answers
from service.hosting.batching import Coalescer
from service.hosting.catalogue import Catalogue
from service.hosting.compute import Compute
from service.hosting.eager import started
from service.hosting.hosted import Counters, HostedModel, Pending, Published
from service.hosting.limits import Limits
from service.hosting.records import LogEntry
from service.hosting.recovery import Recovery
from service.hosting.snapshots import Snapshots
from service.schemas import UpdateResponse
from service.store import Lease, Store

__all__ = ["Updates"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


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
        coalescer: Coalescer | None = None,
    ) -> None:
        self.settings, self.store, self.lease = settings, store, lease
        self.catalogue, self.limits, self.compute = catalogue, limits, compute
        self.recovery, self.snapshots = recovery, snapshots
        self.coalescer = coalescer  # POSTSERVE_BATCH_STEPS: one-row steps batched across models
        self.counters = Counters()

    def refused(self, name: str, code: str) -> None:
        """Count an update of ``name`` refused with error ``code`` before it got here (the
        HTTP edge's body validation)."""
        self.counters.note_rejected(self.catalogue.find(name), code)

    async def apply(self, h: HostedModel, entry: LogEntry) -> UpdateResponse:
        """Apply one log entry to ``h`` by the protocol above; refusals are counted."""
        return UpdateResponse.model_validate_json(await self.apply_json(h, entry))

    async def apply_json(self, h: HostedModel, entry: LogEntry) -> bytes:
        """:meth:`apply`'s answer as JSON (``answers.update_json``: no response model built),
        the bytes a ``request_id``'s record keeps."""
        return await self._counted(h, self._apply(h, entry))

    async def apply_keyed(
        self,
        h: HostedModel,
        x: list[list[float]],
        y: list[Label],
        request_ids: Sequence[str],
        outputs: list[int] | None = None,
    ) -> list[answers.Keyed]:
        """Apply rows ``x``, ``y`` (row i observing output ``outputs[i]`` alone where given),
        row i answering ``request_ids[i]`` (see the module's docstring); one answer per row, in
        order (its version, and whether its key was applied before); refusals are counted."""
        return await self._counted(h, self._apply_keyed(h, x, y, request_ids, outputs))

    async def _counted(self, h: HostedModel, work: Awaitable[T]) -> T:
        try:
            return await work
        except PostserveError as exc:
            if not isinstance(exc, NotReady):
                self.counters.note_rejected(h, exc.code)
            raise

    async def hosted(self, name: str) -> HostedModel:
        """The model called ``name`` (an unknown name is counted as a refused update)."""
        try:
            return await self.catalogue.fetch(name)
        except NotFound as exc:
            self.counters.note_rejected(None, exc.code)
            raise

    def counted_now(self, h: HostedModel, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """``fn(*args)``, a refusal it raises counted against ``h``."""
        try:
            return fn(*args)
        except PostserveError as exc:
            self.counters.note_rejected(h, exc.code)
            raise

    def _admit(
        self,
        h: HostedModel,
        x: list[list[float]],
        y: Sequence[Label],
        outputs: list[int] | None,
        what: str,
    ) -> None:
        self.limits.rows(x, h.filter.network.input_dim, what)
        if len(y) != len(x):
            raise InvalidInput(f"x has {len(x)} rows but y has {len(y)}")
        if outputs is not None:
            check_outputs(outputs, len(x), h.filter.network.output_dim)

    @asynccontextmanager
    async def _writing(self, h: HostedModel, request_ids: Sequence[str]) -> AsyncIterator[None]:
        """Under the model's lock, as its writer, in step with the store: resynced first if this
        replica newly writes it, a write of it failed, or one of ``request_ids`` is pending."""
        async with h.lock:
            if h.deleted:
                raise NotFound(f"no model named {h.name!r}")
            try:
                newly = await self.lease.acquire(h.name)  # newly the writer: catch up first
            except NotFound:  # deleted by another replica since this one hosted it
                self.catalogue.drop(h)
                raise
            if newly or h.stale or h.pending_request(request_ids):
                await self.recovery.resync(h)
            yield

    async def _apply(self, h: HostedModel, entry: LogEntry) -> bytes:
        self._admit(h, entry.x, entry.y, entry.outputs, "update")
        n, rid = len(entry.x), entry.request_id
        async with self._writing(h, [] if rid is None else [rid]):
            if rid is not None:
                first = await self.store.get_response(h.name, rid)
                if first is not None:
                    return _duplicate(first)
            tip, new, infos, obs, kernel = await self._step(h, entry.x, entry.y, entry.outputs)
            response = answers.update_json(tip.version + n, infos, obs)
            requests = [] if rid is None else [(rid, response)]
            record = LogEntry(entry.x, entry.y, rid, kernel, entry.outputs).to_bytes()
            pending = self._pend(h, tip, n, new, obs, record, requests)
        await self._durable(h, pending, n)
        return response

    async def _apply_keyed(
        self,
        h: HostedModel,
        x: list[list[float]],
        y: list[Label],
        request_ids: Sequence[str],
        outputs: list[int] | None,
    ) -> list[answers.Keyed]:
        self._admit(h, x, y, outputs, "reward")
        done: dict[int, answers.Keyed] = {}
        fresh: dict[str, int] = {}  # request id -> its row, for the rows to apply
        pending: Pending[Belief] | None = None
        async with self._writing(h, request_ids):
            firsts = await self.store.get_responses(h.name, request_ids)
            for i, (rid, first) in enumerate(zip(request_ids, firsts, strict=True)):
                if first is not None:
                    done[i] = answers.Keyed.first(first)
                elif rid not in fresh:
                    fresh[rid] = i
            if fresh:
                rows = list(fresh.values())
                these = None if outputs is None else [outputs[i] for i in rows]
                pending, each = await self._pend_keyed(
                    h, [x[i] for i in rows], [y[i] for i in rows], list(fresh), these
                )
                done.update(zip(rows, each, strict=True))
        if pending is not None:
            await self._durable(h, pending, len(fresh))
        elif self.snapshots.due(h):
            self.snapshots.spawn(h)
        for i, rid in enumerate(request_ids):  # a repeat within the batch: its first row's answer
            if i not in done:
                done[i] = dataclasses.replace(done[fresh[rid]], duplicate=True)
        return [done[i] for i in range(len(request_ids))]

    async def _pend_keyed(
        self,
        h: HostedModel,
        x: list[list[float]],
        y: list[Label],
        ids: Sequence[str],
        outputs: list[int] | None,
    ) -> tuple[Pending[Belief], list[answers.Keyed]]:
        """Compute new rows from the tip and hand them to the store as one record, with one
        request record per row (each row's answer as it would have answered alone, encoded
        straight from its floats: ``answers.update_json``)."""
        tip, new, infos, obs, kernel = await self._step(h, x, y, outputs)
        versions = range(tip.version + 1, tip.version + 1 + len(infos))
        records = [
            (rid, answers.update_json(v, [info], [ob]))
            for rid, v, info, ob in zip(ids, versions, infos, obs, strict=True)
        ]
        record = LogEntry(x, y, None, kernel, outputs).to_bytes()
        each = [answers.Keyed(v, False) for v in versions]
        return self._pend(h, tip, len(x), new, obs, record, records), each

    async def _step(
        self, h: HostedModel, x: list[list[float]], y: Sequence[Label], outputs: list[int] | None
    ) -> tuple[Published[Belief], Belief, list[RowReport], list[Observation], str | None]:
        """The tip, the state after rows ``x``, ``y`` from it (not yet visible), and the key of
        the compiled step that computed it (None: the eager step), for its log record."""
        tip = h.tip
        batched = self.coalescer is not None and len(x) == 1 and outputs is None
        if batched and batchable(h.filter):
            return await self._batched(h, tip, x, y)
        # read once: a kernel built meanwhile waits for the next request
        kernel: RowKernel[Belief] | OutputKernels[Belief] | None = h.kernel
        if outputs is not None and h.filter.network.output_dim > 1:
            kernel = h.output_kernels  # rows of one output: the restricted filters' steps
            if kernel is None:
                self.catalogue.kernels.start_outputs(h)  # built in the background, once
        work = h.filter.state_bytes(tip.state) * len(x)
        new, infos, obs = await self.compute.run(
            work, h.step, tip.state, x, y, kernel, outputs, compiled=kernel is not None
        )
        return tip, new, infos, obs, None if kernel is None else kernel.key

    async def _batched(
        self, h: HostedModel, tip: Published[Belief], x: list[list[float]], y: Sequence[Label]
    ) -> tuple[Published[Belief], Belief, list[RowReport], list[Observation], str | None]:
        """``_step`` of one row through the coalescer (``service.hosting.batching``): stepped
        with other models' rows of the same window; eagerly if its checks failed there."""
        assert self.coalescer is not None
        X, Y = h.row(x, y)
        done = await self.coalescer.step(h, tip.state, X, Y)
        if done is None:  # the eager step retries, or raises the exact error
            return tip, *h.step(tip.state, x, y), None
        rows = [done.report]
        return tip, done.state, rows, h.reported_gaussian(rows, x, y), h.batch_key

    def _pend(
        self,
        h: HostedModel,
        tip: Published[Belief],
        n: int,
        new: Belief,
        obs: list[Observation],
        record: bytes,
        requests: list[tuple[str, bytes]],
    ) -> Pending[Belief]:
        """Hand the record of ``n`` rows after ``tip`` (and its request records) to the store,
        following the tip's version, and make it the new tip; the caller holds the lock."""
        version = tip.version + n
        append = self.store.append(h.name, version, record, requests=requests, after=tip.version)
        ids = tuple(rid for rid, _ in requests)
        pending = Pending(tip.version, version, new, obs, ids, started(append))
        # Started now: the append queues the record in the store (or writes it) before the next
        # holder of the lock resumes, so the store sees the model's records in version order
        # (and with ``after``, a record out of order would be refused, never written after a
        # gap). An append that finished at once is published by ``pend`` itself.
        h.pend(pending)
        return pending

    async def _durable(self, h: HostedModel, pending: Pending[Belief], n: int) -> None:
        """Wait (without the lock) for ``pending``'s commit: published once durable, or the
        error it failed with."""
        try:
            if pending.commit.done():  # no turn of the event loop
                pending.commit.result()
            else:
                await asyncio.shield(pending.commit)  # a cancelled request leaves it be
        except PostserveError as exc:
            raise h.chain_error(pending, exc) from exc
        self.counters.note_applied(h, n)
        if self.snapshots.due(h):
            self.snapshots.spawn(h)


def _duplicate(first: bytes) -> bytes:
    """A repeated ``request_id``'s answer: its first, marked ``duplicate``."""
    answer = orjson.loads(first)
    answer["duplicate"] = True
    return orjson.dumps(answer)
