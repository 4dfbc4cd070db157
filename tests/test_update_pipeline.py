"""The update pipeline with group commit (docs/architecture.md section 2), in process.

Updates of one model are computed one at a time under its lock and then wait for their commits
together. These tests hold commits at a gate (a memory store whose appends wait, and fail on
demand) to check what the pipeline promises while they wait: nothing is published before its
commit, a failed commit fails the pending updates after it and nothing of them is published, a
pending ``request_id`` is applied once, a delete waits for the model's pending commits, and a
cancelled request's commit still publishes. One test runs the real SQLite store: concurrent
updates of one model share commits, and a restart restores the same state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from service.config import Settings
from service.errors import StoreUnavailable, VersionConflict
from service.hosting.engine import Engine
from service.schemas import ModelSpec, PredictRequest, UpdateRequest, UpdateResponse
from service.store import Backend, MemoryStore, SoleWriter, SQLiteStore, Store
from service.testing import linear_spec

SPEC = ModelSpec.model_validate(linear_spec("m", 2, filter="kalman", dtype="float64"))
PROBE = PredictRequest(x=[[0.5, -1.0]])


def _update(i: int, request_id: str | None = None) -> UpdateRequest:
    return UpdateRequest(x=[[0.1 * i, 1.0 - 0.2 * i]], y=[0.3 * i - 0.5], request_id=request_id)


class GatedStore(MemoryStore):
    """A memory store whose appends wait at ``gate`` (in the order they were called) and raise
    StoreUnavailable for the versions in ``fail``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: set[int] = set()
        self.waiting: list[int] = []

    async def append(
        self,
        name: str,
        version: int,
        record: bytes,
        request_id: str | None = None,
        response: bytes | None = None,
        requests: Sequence[tuple[str, bytes]] = (),
        *,
        after: int | None = None,
    ) -> None:
        self.waiting.append(version)
        await self.gate.wait()  # waiters wake in the order they came: the call order is kept
        self.waiting.remove(version)
        if version in self.fail:
            raise StoreUnavailable(f"injected: the commit of version {version} failed")
        await super().append(name, version, record, request_id, response, requests, after=after)


def _engine(store: Store) -> Engine:
    settings = Settings(
        store="memory", device="cpu", snapshot_every=10**6, snapshot_interval_s=3600
    )
    return Engine(settings, Backend(store, SoleWriter()))


def _run(store: Store, body: Callable[[Engine], Awaitable[None]]) -> None:
    async def main() -> None:
        engine = _engine(store)
        await engine.start()
        try:
            while not engine.ready:
                await asyncio.sleep(0.01)
            await body(engine)
        finally:
            await engine.stop()

    asyncio.run(main())


async def _until(check: Callable[[], bool]) -> None:
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("timed out waiting for the pipeline")


async def _replayed(updates: list[UpdateRequest]) -> bytes:
    """The /predict answer of a fresh model fed ``updates`` one by one."""
    fresh = _engine(MemoryStore())
    await fresh.start()
    try:
        while not fresh.ready:
            await asyncio.sleep(0.01)
        await fresh.create(SPEC)
        for u in updates:
            await fresh.update("m", u)
        return (await fresh.predict("m", PROBE)).model_dump_json().encode()
    finally:
        await fresh.stop()


async def _answer(engine: Engine) -> bytes:
    return (await engine.predict("m", PROBE)).model_dump_json().encode()


def test_nothing_is_published_before_its_commit() -> None:
    store = GatedStore()

    async def body(engine: Engine) -> None:
        await engine.create(SPEC)
        before = await _answer(engine)
        store.gate.clear()
        tasks = [asyncio.ensure_future(engine.update("m", _update(i))) for i in range(5)]
        await _until(lambda: len(store.waiting) == 5)  # all five computed and handed over
        assert store.waiting == [1, 2, 3, 4, 5]  # in version order
        h = engine.catalogue.get("m")
        assert h.version == 0 and len(h.pending) == 5
        assert (await engine.info("m")).version == 0
        assert await _answer(engine) == before  # predictions see the published state only
        store.gate.set()
        answers = await asyncio.gather(*tasks)
        assert [a.version for a in answers] == [1, 2, 3, 4, 5]
        assert h.version == 5 and not h.pending
        assert await _answer(engine) == await _replayed([_update(i) for i in range(5)])

    _run(store, body)


def test_a_failed_commit_fails_the_pending_updates_after_it_and_publishes_none_of_them() -> None:
    store = GatedStore()

    async def body(engine: Engine) -> None:
        await engine.create(SPEC)
        await engine.update("m", _update(0))
        store.gate.clear()
        store.fail = {3}
        tasks = [asyncio.ensure_future(engine.update("m", _update(i))) for i in range(1, 5)]
        await _until(lambda: len(store.waiting) == 4)
        store.gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert not isinstance(outcomes[0], BaseException) and outcomes[0].version == 2
        for o in outcomes[1:]:  # version 3 failed; 4 and 5 were computed on it: they fail too
            assert isinstance(o, StoreUnavailable), o
            assert not isinstance(o, VersionConflict)
        assert "version 3" in str(outcomes[2]) and "version 3" in str(outcomes[3])
        h = engine.catalogue.get("m")
        assert h.version == 2 and h.stale
        assert [r.version for r in await store.read_log("m")] == [1, 2]
        assert await _answer(engine) == await _replayed([_update(0), _update(1)])
        assert engine.stats().rejected["store_unavailable"] == 3
        store.fail = set()
        again = await engine.update("m", _update(9))  # rolled back: goes on from version 2
        assert again.version == 3 and not h.stale
        assert [r.version for r in await store.read_log("m")] == [1, 2, 3]
        assert await _answer(engine) == await _replayed([_update(0), _update(1), _update(9)])

    _run(store, body)


def test_a_pending_request_id_is_applied_once() -> None:
    store = GatedStore()

    async def body(engine: Engine) -> None:
        await engine.create(SPEC)
        store.gate.clear()
        first = asyncio.ensure_future(engine.update("m", _update(1, "req")))
        await _until(lambda: len(store.waiting) == 1)
        twins = [asyncio.ensure_future(engine.update("m", _update(1, "req"))) for _ in range(3)]
        other = asyncio.ensure_future(engine.update("m", _update(2)))
        await asyncio.sleep(0.05)
        assert store.waiting == [1]  # the twins wait for the first; nothing else got ahead
        store.gate.set()
        answers = await asyncio.gather(first, *twins, other)
        assert [a.duplicate for a in answers] == [False, True, True, True, False]
        assert [a.version for a in answers] == [1, 1, 1, 1, 2]
        assert [r.version for r in await store.read_log("m")] == [1, 2]

    _run(store, body)


def test_a_delete_waits_for_the_pending_commits() -> None:
    store = GatedStore()

    async def body(engine: Engine) -> None:
        await engine.create(SPEC)
        store.gate.clear()
        update = asyncio.ensure_future(engine.update("m", _update(1)))
        await _until(lambda: len(store.waiting) == 1)
        delete = asyncio.ensure_future(engine.delete("m"))
        await asyncio.sleep(0.02)
        assert not delete.done()
        store.gate.set()
        await delete
        assert (await update).version == 1  # it was durable before the delete removed it
        assert await store.read_log("m") == []  # nothing landed after the delete
        await engine.create(SPEC)
        assert (await engine.info("m")).version == 0

    _run(store, body)


def test_a_cancelled_request_still_publishes_its_commit() -> None:
    store = GatedStore()

    async def body(engine: Engine) -> None:
        await engine.create(SPEC)
        store.gate.clear()
        task = asyncio.ensure_future(engine.update("m", _update(1)))
        await _until(lambda: len(store.waiting) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        store.gate.set()
        h = engine.catalogue.get("m")
        await _until(lambda: h.version == 1)  # the log has it, so the model has it
        assert (await engine.update("m", _update(2))).version == 2
        assert await _answer(engine) == await _replayed([_update(1), _update(2)])

    _run(store, body)


def test_concurrent_updates_of_one_model_share_sqlite_commits_and_restore(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    seen: dict[str, object] = {}

    async def body(engine: Engine) -> None:
        await engine.create(SPEC)
        store = engine.store
        assert isinstance(store, SQLiteStore)
        before = store.commits
        answers = await asyncio.gather(*(engine.update("m", _update(i)) for i in range(40)))
        assert sorted(a.version for a in answers) == list(range(1, 41))
        assert store.commits - before <= 10  # 40 updates of one model, a few commits
        assert (await engine.info("m")).version == 40
        seen["answer"] = await _answer(engine)

    async def restored(engine: Engine) -> None:
        assert (await engine.info("m")).version == 40
        assert await _answer(engine) == seen["answer"]

    _run(SQLiteStore(path), body)
    _run(SQLiteStore(path), restored)


# -- keyed batches (reward batches): the same pending chain ------------------------------------


def _row(i: int) -> tuple[list[float], float]:
    return [0.3 - 0.1 * i, 0.2 * i], 0.25 * i - 0.4


def _keyed(engine: Engine, ids: list[str], rows: list[int]) -> Awaitable[list[UpdateResponse]]:
    """``Updates.apply_keyed`` of rows ``_row(i)``, row k answering ``ids[k]``."""
    h = engine.catalogue.get("m")
    x, y = zip(*(_row(i) for i in rows), strict=True)
    return engine.updates.apply_keyed(h, list(x), list(y), ids)


def _as_update(*rows: int) -> UpdateRequest:
    """Rows ``_row(i)`` as one update: what a keyed batch's log record replays as (one request
    of its rows; the Kalman filter takes them as one block update, docs/algorithms.md 3.7)."""
    x, y = zip(*(_row(i) for i in rows), strict=True)
    return UpdateRequest(x=list(x), y=list(y))


def test_a_keyed_batch_is_computed_from_the_tip_and_published_after_its_commit() -> None:
    store = GatedStore()

    async def body(engine: Engine) -> None:
        await engine.create(SPEC)
        store.gate.clear()
        first = asyncio.ensure_future(engine.update("m", _update(1)))
        keyed = asyncio.ensure_future(_keyed(engine, ["e1", "e2", "e1"], [1, 2, 1]))
        last = asyncio.ensure_future(engine.update("m", _update(2)))
        await _until(lambda: len(store.waiting) == 3)
        assert store.waiting == [1, 3, 4]  # the batch's two new rows are one record, after 1
        h = engine.catalogue.get("m")
        assert h.version == 0 and len(h.pending) == 3
        assert await store.get_responses("m", ["e1", "e2"]) == [None, None]
        store.gate.set()
        answers = await keyed
        assert [(a.version, a.duplicate) for a in answers] == [(2, False), (3, False), (2, True)]
        assert (await first).version == 1 and (await last).version == 4
        assert h.version == 4 and not h.pending
        assert [r.version for r in await store.read_log("m")] == [1, 3, 4]
        stored = await store.get_responses("m", ["e1", "e2"])
        assert [UpdateResponse.model_validate_json(b or b"").version for b in stored] == [2, 3]
        replay = [_update(1), _as_update(1, 2), _update(2)]
        assert await _answer(engine) == await _replayed(replay)
        again = await _keyed(engine, ["e2", "e1"], [2, 1])  # retried: applied once, as before
        assert [(a.version, a.duplicate) for a in again] == [(3, True), (2, True)]
        assert h.version == 4

    _run(store, body)


def test_a_failed_commit_before_a_keyed_batch_fails_all_of_it() -> None:
    store = GatedStore()

    async def body(engine: Engine) -> None:
        await engine.create(SPEC)
        await engine.update("m", _update(0))
        store.gate.clear()
        store.fail = {2}
        update = asyncio.ensure_future(engine.update("m", _update(1)))
        keyed = asyncio.ensure_future(_keyed(engine, ["e1", "e2"], [1, 2]))
        await _until(lambda: len(store.waiting) == 2)
        store.gate.set()
        outcomes = await asyncio.gather(update, keyed, return_exceptions=True)
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        assert "version 2" in str(outcomes[1])  # it answers the failure it followed
        h = engine.catalogue.get("m")
        assert h.version == 1 and h.stale
        assert [r.version for r in await store.read_log("m")] == [1]
        assert await store.get_responses("m", ["e1", "e2"]) == [None, None]
        store.fail = set()
        answers = await _keyed(engine, ["e1", "e2"], [1, 2])  # retried: applied now, whole
        assert [(a.version, a.duplicate) for a in answers] == [(2, False), (3, False)]
        assert not h.stale
        assert await _answer(engine) == await _replayed([_update(0), _as_update(1, 2)])

    _run(store, body)


def test_a_pending_request_id_of_a_keyed_batch_waits_for_its_twin() -> None:
    store = GatedStore()

    async def body(engine: Engine) -> None:
        await engine.create(SPEC)
        store.gate.clear()
        first = asyncio.ensure_future(_keyed(engine, ["e1", "e2"], [1, 2]))
        await _until(lambda: len(store.waiting) == 1)
        twin = asyncio.ensure_future(_keyed(engine, ["e2", "e3"], [2, 3]))
        single = asyncio.ensure_future(
            engine.update("m", UpdateRequest(x=[_row(1)[0]], y=[_row(1)[1]], request_id="e1"))
        )
        await asyncio.sleep(0.05)
        assert store.waiting == [2]  # the twins wait for the first batch's commit
        store.gate.set()
        answers = await first
        assert [(a.version, a.duplicate) for a in answers] == [(1, False), (2, False)]
        assert [(a.version, a.duplicate) for a in await twin] == [(2, True), (3, False)]
        assert ((await single).version, (await single).duplicate) == (1, True)
        assert [r.version for r in await store.read_log("m")] == [2, 3]

    _run(store, body)
