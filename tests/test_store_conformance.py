"""One conformance suite for every store backend (the byte-level protocol of service.store.base).

Add a backend by adding a branch to ``_make`` and its name to ``BACKENDS``. The write leases
(service.store.lease: ``SoleWriter`` for the single-process stores, the Redis store's
``RedisLease``) are tested at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from service.errors import NotFound, NotOwner, StoreUnavailable, VersionConflict
from service.store import (
    Backend,
    Lease,
    MemoryStore,
    RedisLease,
    RedisStore,
    Snapshot,
    SoleWriter,
    SQLiteStore,
    Store,
)
from service.testing import RedisServer

BACKENDS = ["memory", "sqlite", "redis"]
Body = Callable[[Store], Awaitable[None]]


_REDIS: dict[str, str] = {}


def _make(kind: str, tmp_path: Path, ttl: float = 3600.0, prefix: str | None = None) -> Backend:
    """A store of that kind and its lease, as ``service.store.make_backend`` pairs them."""
    if kind == "memory":
        return Backend(MemoryStore(ttl), SoleWriter())
    if kind == "redis":
        # A fresh key prefix per test on the session's redis-server keeps tests independent.
        prefix = prefix or f"t{time.monotonic_ns()}:"
        redis = RedisStore(_REDIS["url"], ttl, prefix=prefix, lease_ms=5000)
        return Backend(redis, redis.lease)
    return Backend(SQLiteStore(tmp_path / "store.sqlite3", ttl), SoleWriter())


def _run(
    kind: str, tmp_path: Path, body: Body, ttl: float = 3600.0, reopen: Body | None = None
) -> None:
    """Open a fresh store, run the test body in one event loop, close it; then, with ``reopen``,
    run that on the same data through a new store object (the memory store: the same one).

    The Redis store writes a model only while it holds the model's lease, so the body's writes
    go through the lease's ``acquire`` first (``SoleWriter`` for the single-process stores)."""
    prefix = f"t{time.monotonic_ns()}:"

    async def main() -> None:
        backend = _make(kind, tmp_path, ttl, prefix)
        await backend.store.open()
        try:
            await body(_Leased(backend.store, backend.lease))
            if reopen is not None and kind == "memory":
                await reopen(_Leased(backend.store, backend.lease))
        finally:
            await backend.store.close()
        if reopen is not None and kind != "memory":
            again = _make(kind, tmp_path, ttl, prefix)
            await again.store.open()
            try:
                await reopen(_Leased(again.store, again.lease))
            finally:
                await again.store.close()

    asyncio.run(main())


class _Leased:
    """Acquires a model's write lease before each append or snapshot, like the engine does."""

    def __init__(self, store: Store, lease: Lease) -> None:
        self._store, self._lease = store, lease

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def hold(self, name: str) -> None:
        """Take the model's write lease now, so that later appends queue without waiting."""
        await self._lease.acquire(name)

    @property
    def commits(self) -> int | None:
        """The store's count of commits (batches), if it batches."""
        commits = getattr(self._store, "commits", None)
        return None if commits is None else int(commits)

    async def append(self, name: str, *args: object, **kw: object) -> None:
        await self._lease.acquire(name)
        await self._store.append(name, *args, **kw)  # type: ignore[arg-type]

    async def put_snapshot(self, name: str, snapshot: Snapshot) -> None:
        await self._lease.acquire(name)
        await self._store.put_snapshot(name, snapshot)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    _REDIS["url"] = server.url
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        request.getfixturevalue("redis_url")
    return str(request.param)


NOT_UTF8 = b"\xff\xfe\x00spec\x80"


def test_catalogue(kind: str, tmp_path: Path) -> None:
    async def body(s: Store) -> None:
        assert await s.create_model("a", NOT_UTF8)
        assert not await s.create_model("a", b"other")
        assert await s.create_model("b", b"{}")
        assert await s.list_models() == {"a": NOT_UTF8, "b": b"{}"}
        assert await s.get_model("a") == NOT_UTF8 and await s.get_model("b") == b"{}"
        assert await s.get_model("c") is None
        await s.append("a", 1, b"r1", "req", b"resp")
        await s.put_snapshot("a", Snapshot(1, b"t", b"m"))
        assert await s.delete_model("a")
        assert not await s.delete_model("a")
        assert await s.list_models() == {"b": b"{}"}
        assert await s.get_model("a") is None
        assert await s.read_log("a") == []
        assert await s.get_snapshot("a") is None
        assert await s.get_response("a", "req") is None
        assert await s.create_model("a", b"new")  # the name is free again, with nothing left over
        assert await s.read_log("a") == []

    _run(kind, tmp_path, body)


def test_log_order_filtering_and_exact_bytes(kind: str, tmp_path: Path) -> None:
    payloads = [os.urandom(n) for n in (0, 1, 17, 4096, 1 << 20)]

    async def body(s: Store) -> None:
        await s.create_model("m", b"{}")
        await s.create_model("n", b"{}")
        for i, p in enumerate(payloads):
            await s.append("m", 10 * (i + 1), p)
        await s.append("n", 5, b"other model")
        log = await s.read_log("m")
        assert [r.version for r in log] == [10, 20, 30, 40, 50]
        assert [r.record for r in log] == payloads
        assert [r.version for r in await s.read_log("m", after=20)] == [30, 40, 50]
        assert [r.version for r in await s.read_log("m", after=25)] == [30, 40, 50]
        assert await s.read_log("m", after=50) == []
        assert [r.record for r in await s.read_log("n")] == [b"other model"]

    _run(kind, tmp_path, body)


def test_stale_or_repeated_version_is_a_conflict_and_changes_nothing(
    kind: str, tmp_path: Path
) -> None:
    async def body(s: Store) -> None:
        await s.create_model("m", b"{}")
        await s.create_model("n", b"{}")
        await s.append("m", 3, b"a", "first", b"answer-1")
        for stale in (3, 2, 0):  # repeated, then behind
            with pytest.raises(VersionConflict):
                await s.append("m", stale, b"b", "second", b"answer-2")
        with pytest.raises(VersionConflict):
            await s.append("m", 3, b"b")  # without a request record as well
        assert [(r.version, r.record) for r in await s.read_log("m")] == [(3, b"a")]
        assert await s.get_response("m", "first") == b"answer-1"
        assert await s.get_response("m", "second") is None
        await s.append("n", 1, b"other model")  # versions are per model
        await s.append("m", 4, b"c")  # the log goes on past the refusals
        await s.append("m", 5, b"d")
        await s.put_snapshot("m", Snapshot(5, b"t", b"m"))  # trims every record
        assert await s.read_log("m") == []
        for stale in (5, 4):  # still refused when the records at or above it are trimmed
            with pytest.raises(VersionConflict):
                await s.append("m", stale, b"e", "third", b"answer-3")
        assert await s.read_log("m") == []
        assert await s.get_response("m", "third") is None
        assert await s.get_snapshot("m") == Snapshot(5, b"t", b"m")
        await s.append("m", 6, b"f")
        assert [(r.version, r.record) for r in await s.read_log("m")] == [(6, b"f")]
        assert [r.record for r in await s.read_log("n")] == [b"other model"]

    _run(kind, tmp_path, body)


def test_request_records(kind: str, tmp_path: Path) -> None:
    async def body(s: Store) -> None:
        await s.create_model("m", b"{}")
        await s.create_model("n", b"{}")
        await s.append("m", 1, b"r", "id-1", b"resp-1")
        await s.append("m", 2, b"r")  # no request id
        assert await s.get_response("m", "id-1") == b"resp-1"
        assert await s.get_response("n", "id-1") is None  # ids are per model
        assert await s.get_response("m", "unknown") is None

    _run(kind, tmp_path, body)


def test_one_record_answering_several_requests(kind: str, tmp_path: Path) -> None:
    """A batch of rewards: one log record, one request record per event, all or nothing."""

    async def body(s: Store) -> None:
        await s.create_model("m", b"{}")
        await s.create_model("n", b"{}")
        await s.append("m", 3, b"batch", requests=[("e1", b"a1"), ("e2", NOT_UTF8), ("e3", b"")])
        await s.append("m", 4, b"one", "e4", b"a4", requests=[("e5", b"a5")])
        got = await s.get_responses("m", ["e2", "nobody", "e1", "e3", "e4", "e5", "e1"])
        assert got == [NOT_UTF8, None, b"a1", b"", b"a4", b"a5", b"a1"]
        assert await s.get_response("m", "e2") == NOT_UTF8
        assert await s.get_responses("n", ["e1"]) == [None]  # ids are per model
        assert await s.get_responses("m", []) == []
        with pytest.raises(VersionConflict):  # refused: none of its request records is kept
            await s.append("m", 4, b"stale", requests=[("e6", b"a6"), ("e7", b"a7")])
        assert await s.get_responses("m", ["e6", "e7"]) == [None, None]
        assert [(r.version, r.record) for r in await s.read_log("m")] == [
            (3, b"batch"),
            (4, b"one"),
        ]

    _run(kind, tmp_path, body)


def test_events_in_batches(kind: str, tmp_path: Path) -> None:
    async def body(s: Store) -> None:
        await s.create_model("m", b"{}")
        await s.create_model("n", b"{}")
        now = time.time()
        assert await s.put_event("m", "old", b"0", now + 3600)
        batch = [("a", NOT_UTF8), ("old", b"again"), ("b", b"2"), ("a", b"twice"), ("c", b"3")]
        assert await s.put_events("m", batch, now + 0.4) == [True, False, True, False, True]
        assert await s.put_events("m", [], now + 1) == []
        assert await s.put_events("n", [("a", b"other model")], now + 3600) == [True]
        got = await s.get_events("m", ["b", "nobody", "a", "old", "a"])
        assert got == [b"2", None, NOT_UTF8, b"0", NOT_UTF8]  # the first record of an id stays
        assert await s.get_events("m", []) == []
        await s.settle_events("m", ["a", "nobody", "b"])
        await s.settle_events("m", [])
        assert await s.get_events("m", ["a", "b"]) == [NOT_UTF8, b"2"]  # settled: still readable
        await asyncio.sleep(0.6)
        assert await s.get_events("m", ["a", "c", "old"]) == [None, None, b"0"]  # expired
        assert await s.expired_events("m", time.time()) == [("c", b"3")]  # a, b were settled
        assert await s.get_events("n", ["a"]) == [b"other model"]

    _run(kind, tmp_path, body)


def test_request_records_expire(kind: str, tmp_path: Path) -> None:
    async def body(s: Store) -> None:
        await s.create_model("m", b"{}")
        await s.append("m", 1, b"r", "id-1", b"resp-1")
        assert await s.get_response("m", "id-1") == b"resp-1"
        await asyncio.sleep(0.35)
        assert await s.get_response("m", "id-1") is None

    _run(kind, tmp_path, body, ttl=0.2)


def test_snapshots_replace_and_trim(kind: str, tmp_path: Path) -> None:
    async def body(s: Store) -> None:
        await s.create_model("m", b"{}")
        assert await s.get_snapshot("m") is None
        for v in range(1, 8):
            await s.append("m", v, f"r{v}".encode())
        tensors = os.urandom(300_000)
        await s.put_snapshot("m", Snapshot(4, tensors, b'{"version": 4}'))
        snap = await s.get_snapshot("m")
        assert snap == Snapshot(4, tensors, b'{"version": 4}')
        assert [r.version for r in await s.read_log("m")] == [5, 6, 7]
        await s.put_snapshot("m", Snapshot(6, b"t6", b"m6"))
        assert await s.get_snapshot("m") == Snapshot(6, b"t6", b"m6")
        assert [r.version for r in await s.read_log("m")] == [7]
        await s.append("m", 8, b"r8")  # the log goes on after a trim
        assert [r.version for r in await s.read_log("m", after=6)] == [7, 8]

    _run(kind, tmp_path, body)


def test_ping(kind: str, tmp_path: Path) -> None:
    async def body(s: Store) -> None:
        assert await s.ping()

    _run(kind, tmp_path, body)


def test_sqlite_survives_reopen_in_wal_mode(tmp_path: Path) -> None:
    async def write(s: Store) -> None:
        await s.create_model("m", NOT_UTF8)
        await s.append("m", 1, b"one", "id", b"answer")
        await s.append("m", 2, b"two")
        await s.put_snapshot("m", Snapshot(1, b"t", b"m"))

    async def read(s: Store) -> None:
        assert await s.list_models() == {"m": NOT_UTF8}
        assert [(r.version, r.record) for r in await s.read_log("m")] == [(2, b"two")]
        assert await s.get_response("m", "id") == b"answer"
        assert await s.get_snapshot("m") == Snapshot(1, b"t", b"m")

    _run("sqlite", tmp_path, write)
    _run("sqlite", tmp_path, read)
    db = sqlite3.connect(tmp_path / "store.sqlite3")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_sqlite_closed_store_is_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3")
        await store.open()
        await store.close()
        assert not await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.append("m", 1, b"x")

    asyncio.run(main())


_WRITER = """
import asyncio, sys
from service.store import SQLiteStore

async def main():
    store = SQLiteStore(sys.argv[1])
    await store.open()
    await store.create_model("m", b"{}")
    v = 0
    while True:
        v += 1
        await store.append("m", v, b"x" * 512, f"id-{v}", b"answer")
        print(v, flush=True)

asyncio.run(main())
"""


def test_sqlite_acknowledged_appends_survive_sigkill(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    path = tmp_path / "crash.sqlite3"
    child = subprocess.Popen(
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True
    )
    acked: list[int] = []
    assert child.stdout is not None
    deadline = time.monotonic() + 20
    try:
        while len(acked) < 50 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acked.append(int(line))
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=10)
        child.stdout.close()
    assert len(acked) == 50, "the writer did not acknowledge 50 appends in time"

    async def check(s: Store) -> None:
        versions = [r.version for r in await s.read_log("m")]
        assert versions == list(range(1, len(versions) + 1))  # no gap, nothing half-written
        assert set(acked) <= set(versions)
        assert await s.get_response("m", f"id-{acked[-1]}") == b"answer"

    async def main() -> None:
        store = SQLiteStore(path)
        await store.open()
        try:
            await check(store)
        finally:
            await store.close()

    asyncio.run(main())


# -- group commit: appends in flight together share one commit --------------------------------


def _commits(s: Store) -> int | None:
    assert isinstance(s, _Leased)
    return s.commits


async def _hold(s: Store, *names: str) -> None:
    assert isinstance(s, _Leased)
    for name in names:
        await s.hold(name)


def test_concurrent_appends_to_several_models_share_commits_and_survive_a_reopen(
    kind: str, tmp_path: Path
) -> None:
    models, last = ["a", "b", "c", "d"], 30

    def record(m: str, v: int) -> bytes:
        return f"{m}:{v}:".encode() + os.urandom(v)

    records: dict[str, list[bytes]] = {
        m: [record(m, v) for v in range(1, last + 1)] for m in models
    }

    async def write(s: Store) -> None:
        for m in models:
            await s.create_model(m, b"{}")
            await s.append(m, 1, records[m][0], f"{m}-1", b"answer-1", after=0)
        before = _commits(s)
        appends = [  # started together, each model's records in version order, interleaved
            asyncio.ensure_future(
                s.append(m, v, records[m][v - 1], f"{m}-{v}", f"answer-{v}".encode(), after=v - 1)
            )
            for v in range(2, last + 1)
            for m in models
        ]
        assert await asyncio.gather(*appends) == [None] * len(appends)
        commits = _commits(s)
        if before is not None and commits is not None:  # sqlite, redis: shared, not one each
            assert commits - before <= len(appends) // 10

    async def read(s: Store) -> None:
        for m in models:
            log = await s.read_log(m)
            assert [r.version for r in log] == list(range(1, last + 1))
            assert [r.record for r in log] == records[m]
            for v in (1, 2, last):
                assert await s.get_response(m, f"{m}-{v}") == f"answer-{v}".encode()

    _run(kind, tmp_path, write, reopen=read)


def test_a_refused_append_fails_alone_and_the_rest_of_its_commit_lands(
    kind: str, tmp_path: Path
) -> None:
    async def body(s: Store) -> None:
        for m in ("m", "n", "k"):
            await s.create_model(m, b"{}")
        await _hold(s, "m", "n", "k")
        await s.append("m", 1, b"m1")
        await s.append("n", 1, b"n1")
        before = _commits(s)
        batch = [  # (name, version, after, request id): one batch, checked one after another
            ("m", 2, 1, "m-2"),  # ok
            ("m", 2, 1, "m-2-again"),  # repeated version: refused
            ("n", 1, None, "n-stale"),  # stale: refused
            ("n", 2, None, "n-2"),  # ok
            ("m", 3, 2, "m-3"),  # ok, after the m 2 of this batch
            ("k", 5, 3, "k-5"),  # k is at 0, not 3: refused
            ("k", 1, 0, "k-1"),  # ok
            ("m", 5, 4, "m-5"),  # m is at 3, not 4: refused
        ]
        outcomes = await asyncio.gather(
            *(
                s.append(m, v, f"{rid}".encode(), rid, f"answer {rid}".encode(), after=after)
                for m, v, after, rid in batch
            ),
            return_exceptions=True,
        )
        refused = [isinstance(o, VersionConflict) for o in outcomes]
        assert refused == [False, True, True, False, False, True, False, True], outcomes
        assert [o for o in outcomes if not isinstance(o, VersionConflict)] == [None] * 4
        commits = _commits(s)
        if before is not None and commits is not None:
            assert commits - before == 1
        assert [(r.version, r.record) for r in await s.read_log("m")] == [
            (1, b"m1"),
            (2, b"m-2"),
            (3, b"m-3"),
        ]
        assert [(r.version, r.record) for r in await s.read_log("n")] == [(1, b"n1"), (2, b"n-2")]
        assert [(r.version, r.record) for r in await s.read_log("k")] == [(1, b"k-1")]
        for (_, _, _, rid), was_refused in zip(batch, refused, strict=True):
            want = None if was_refused else f"answer {rid}".encode()
            assert await s.get_response(rid[0], rid) == want

    _run(kind, tmp_path, body)


def test_records_answering_several_requests_share_a_commit_and_are_refused_whole(
    kind: str, tmp_path: Path
) -> None:
    """Reward batches (one record, one request record per event) in one group commit with
    ``after``: each lands with all its request records or, refused, with none of them."""
    ids = ["e1", "e2", "r4", "e3", "e4", "e5"]

    async def body(s: Store) -> None:
        await s.create_model("m", b"{}")
        await _hold(s, "m")
        await s.append("m", 1, b"m1", after=0)
        before = _commits(s)
        outcomes = await asyncio.gather(
            s.append("m", 3, b"two rows", requests=[("e1", b"a1"), ("e2", b"a2")], after=1),
            s.append("m", 4, b"x", "r4", b"a4", requests=[("e3", b"a3")], after=2),  # m is at 3
            s.append("m", 5, b"two more", requests=[("e4", b"a4"), ("e5", b"a5")], after=3),
            s.append("m", 6, b"y", requests=[("e1", b"not this")], after=4),  # m is at 5
            return_exceptions=True,
        )
        assert outcomes[0] is None and outcomes[2] is None, outcomes
        assert isinstance(outcomes[1], VersionConflict) and isinstance(outcomes[3], VersionConflict)
        commits = _commits(s)
        if before is not None and commits is not None:
            assert commits - before == 1

    async def read(s: Store) -> None:
        assert [(r.version, r.record) for r in await s.read_log("m")] == [
            (1, b"m1"),
            (3, b"two rows"),
            (5, b"two more"),
        ]
        assert await s.get_responses("m", ids) == [b"a1", b"a2", None, None, b"a4", b"a5"]

    _run(kind, tmp_path, body, reopen=read)


def test_after_chains_records_through_trims(kind: str, tmp_path: Path) -> None:
    async def body(s: Store) -> None:
        await s.create_model("m", b"{}")
        with pytest.raises(VersionConflict):
            await s.append("m", 2, b"x", after=1)  # an empty log is at 0
        await s.append("m", 2, b"two", after=0)  # a record of two rows
        await s.append("m", 3, b"three", after=2)
        await s.put_snapshot("m", Snapshot(3, b"t", b"m"))  # trims every record
        with pytest.raises(VersionConflict):
            await s.append("m", 4, b"x", after=2)
        await s.append("m", 4, b"four", after=3)  # the snapshot's version counts
        assert [(r.version, r.record) for r in await s.read_log("m")] == [(4, b"four")]

    _run(kind, tmp_path, body)


def test_sqlite_a_failed_commit_fails_every_append_in_it_and_writes_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locked.sqlite3"

    async def main() -> None:
        store = SQLiteStore(path, timeout_s=0.1)
        await store.open()
        try:
            await store.create_model("m", b"{}")
            await store.create_model("n", b"{}")
            await store.append("m", 1, b"m1", after=0)
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # holds the write lock past the store's timeout
            before = store.commits
            try:
                outcomes = await asyncio.gather(
                    store.append("m", 2, b"m2", "m-2", b"answer", after=1),
                    store.append("n", 1, b"n1", "n-1", b"a", requests=[("e1", b"a1")]),
                    store.append("m", 3, b"m3", after=2),
                    return_exceptions=True,
                )
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            assert [type(o) for o in outcomes] == [StoreUnavailable] * 3, outcomes
            assert store.commits - before == 1  # one commit, and it failed as a whole
            assert [r.version for r in await store.read_log("m")] == [1]
            assert await store.read_log("n") == []
            assert await store.get_response("m", "m-2") is None
            assert await store.get_responses("n", ["n-1", "e1"]) == [None, None]
            with pytest.raises(VersionConflict):  # its predecessor never landed
                await store.append("m", 3, b"m3", after=2)
            await store.append("m", 2, b"m2 again", after=1)
            assert [r.record for r in await store.read_log("m")] == [b"m1", b"m2 again"]
        finally:
            await store.close()

    asyncio.run(main())


def test_redis_a_failed_commit_fails_every_append_in_it_and_writes_nothing(
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path / "redis").start()

    async def main() -> None:
        store = RedisStore(redis.url, lease_ms=30_000, timeout_s=0.5)
        await store.open()
        try:
            for m in ("m", "n"):
                await store.create_model(m, b"{}")
                assert await store.lease.acquire(m)
            await store.append("m", 1, b"m1", after=0)
            redis.kill()
            before = store.commits
            outcomes = await asyncio.gather(
                store.append("m", 2, b"m2", "m-2", b"answer", after=1),
                store.append("n", 1, b"n1", requests=[("e1", b"a1"), ("e2", b"a2")], after=0),
                store.append("m", 3, b"m3", after=2),
                return_exceptions=True,
            )
            assert [type(o) for o in outcomes] == [StoreUnavailable] * 3, outcomes
            assert store.commits - before == 1
            redis.start()  # the same AOF: what was acknowledged, and nothing else
            deadline = time.monotonic() + 10
            while not await store.ping():
                assert time.monotonic() < deadline, "redis did not come back"
                await asyncio.sleep(0.05)
            assert [r.version for r in await store.read_log("m")] == [1]
            assert await store.read_log("n") == []
            assert await store.get_response("m", "m-2") is None
            assert await store.get_responses("n", ["e1", "e2"]) == [None, None]
            with pytest.raises(VersionConflict):  # its predecessor never landed
                await store.append("m", 3, b"m3", after=2)
            await store.append("m", 2, b"m2 again", after=1)  # the script reloads itself
            assert [r.record for r in await store.read_log("m")] == [b"m1", b"m2 again"]
        finally:
            await store.close()

    try:
        asyncio.run(main())
    finally:
        redis.stop()


def test_redis_a_fenced_append_fails_alone_in_its_batch(redis_url: str) -> None:
    prefix = f"t{time.monotonic_ns()}:"
    a = _replica(prefix, "a")

    async def body() -> None:
        for m in ("m", "n"):
            await a.create_model(m, b"{}")
            assert await a.lease.acquire(m)
            await a.append(m, 1, b"one", after=0)
        await a.r.set(f"{prefix}lease:n", "b:999")  # another replica took n's lease meanwhile
        before = a.commits
        outcomes = await asyncio.gather(
            a.append("m", 2, b"m2", after=1),
            a.append("n", 2, b"n2", after=1),
            a.append("m", 3, b"m3", after=2),
            return_exceptions=True,
        )
        assert outcomes[0] is None and outcomes[2] is None, outcomes
        assert isinstance(outcomes[1], NotOwner)
        assert a.commits - before == 1
        assert [r.version for r in await a.read_log("m")] == [1, 2, 3]
        assert [r.version for r in await a.read_log("n")] == [1]
        with pytest.raises(NotOwner):
            a.lease.holder("n")  # forgotten: the next write takes the lease afresh

    _replicas(a)(body)


_GROUP_WRITER = """
import asyncio, sys
from service.store import SQLiteStore

async def chain(store, name):
    v, in_flight = 0, []
    while True:  # eight appends of this model in flight at once, each after the one before
        while len(in_flight) < 8:
            v += 1
            task = asyncio.ensure_future(
                store.append(name, v, b"x" * 256, f"id-{v}", b"answer", after=v - 1))
            in_flight.append((v, task))
        done, task = in_flight.pop(0)
        await task
        print(name, done, store.commits, flush=True)

async def main():
    store = SQLiteStore(sys.argv[1])
    await store.open()
    for name in ("a", "b", "c"):
        await store.create_model(name, b"{}")
    await asyncio.gather(*(chain(store, name) for name in ("a", "b", "c")))

asyncio.run(main())
"""


def test_sqlite_group_commits_survive_sigkill(tmp_path: Path) -> None:
    """Three models, eight chained appends each in flight: what was acknowledged survives a
    kill -9, every log has no gap, and the store did share commits."""
    script = tmp_path / "group_writer.py"
    script.write_text(_GROUP_WRITER)
    path = tmp_path / "group.sqlite3"
    child = subprocess.Popen(
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True
    )
    acked: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    commits = 0
    assert child.stdout is not None
    deadline = time.monotonic() + 20
    try:
        while sum(map(len, acked.values())) < 300 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            name, version, commits_so_far = line.split()
            acked[name].append(int(version))
            commits = int(commits_so_far)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=10)
        child.stdout.close()
    assert sum(map(len, acked.values())) == 300, "the writer did not acknowledge 300 appends"
    assert commits < 300 // 2, f"{commits} commits for 300 appends: they were not shared"

    async def main() -> None:
        store = SQLiteStore(path)
        await store.open()
        try:
            for name, versions in acked.items():
                logged = [r.version for r in await store.read_log(name)]
                assert logged == list(range(1, len(logged) + 1))  # no gap, nothing half-written
                assert versions == sorted(versions)  # acknowledged in order
                assert set(versions) <= set(logged)
                if versions:
                    assert await store.get_response(name, f"id-{versions[-1]}") == b"answer"
        finally:
            await store.close()

    asyncio.run(main())


def test_events_expire_settle_and_come_due(kind: str, tmp_path: Path) -> None:
    async def body(s: Store) -> None:
        await s.create_model("m", b"{}")
        await s.create_model("n", b"{}")
        now = time.time()
        assert await s.put_event("m", "late", NOT_UTF8, now + 0.4)
        assert await s.put_event("m", "later", b"2", now + 0.6)
        assert await s.put_event("m", "rewarded", b"3", now + 0.5)
        assert await s.put_event("m", "long", b"4", now + 3600)
        assert await s.put_event("n", "late", b"other model", now + 0.4)
        assert not await s.put_event("m", "late", b"again", now + 3600)  # ids are unique
        assert await s.get_event("m", "late") == NOT_UTF8  # exact bytes, unchanged
        assert await s.get_event("m", "nobody") is None
        await s.settle_event("m", "rewarded")
        assert await s.get_event("m", "rewarded") == b"3"  # readable until it expires
        assert await s.expired_events("m", time.time()) == []
        await asyncio.sleep(0.7)
        assert await s.get_event("m", "late") is None  # expired
        due = await s.expired_events("m", time.time())
        assert due == [("late", NOT_UTF8), ("later", b"2")]  # oldest first; settled not due
        assert await s.expired_events("m", time.time(), limit=1) == [("late", NOT_UTF8)]
        await s.settle_event("m", "late")
        await s.settle_event("m", "later")
        assert await s.expired_events("m", time.time()) == []
        assert await s.expired_events("n", time.time()) == [("late", b"other model")]
        assert await s.delete_model("n")
        assert await s.expired_events("n", time.time() + 7200) == []
        assert await s.get_event("m", "long") == b"4"

    _run(kind, tmp_path, body)


def test_stores_leave_the_write_lease_to_the_lease(kind: str, tmp_path: Path) -> None:
    store = _make(kind, tmp_path).store
    assert not hasattr(store, "acquire")
    assert not hasattr(store, "release")


def test_the_sole_writer_always_holds_the_lease() -> None:
    async def main() -> None:
        lease: Lease = SoleWriter()
        for _ in range(3):
            assert await lease.acquire("m") is False  # nothing to catch up with, ever
        await lease.release("m")
        assert await lease.acquire("m") is False
        await lease.release("never-acquired")

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_single_process_stores_write_without_a_lease(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        store = _make(kind, tmp_path).store
        await store.open()
        try:
            await store.create_model("m", b"{}")
            await store.append("m", 1, b"r")
            await store.put_snapshot("m", Snapshot(1, b"t", b"m"))
            assert await store.get_snapshot("m") == Snapshot(1, b"t", b"m")
        finally:
            await store.close()

    asyncio.run(main())


def _replica(prefix: str, replica: str, lease_ms: int = 5000, idle_s: float = 120.0) -> RedisStore:
    return RedisStore(
        _REDIS["url"], prefix=prefix, replica=replica, lease_ms=lease_ms, idle_s=idle_s
    )


def _replicas(*stores: RedisStore) -> Callable[[Callable[[], Awaitable[None]]], None]:
    """Run a body with the stores open (one event loop), closing them after."""

    def run(body: Callable[[], Awaitable[None]]) -> None:
        async def main() -> None:
            for s in stores:
                await s.open()
            try:
                await body()
            finally:
                for s in stores:
                    await s.close()

        asyncio.run(main())

    return run


def test_redis_lease_one_writer_per_model(redis_url: str) -> None:
    prefix = f"t{time.monotonic_ns()}:"
    a, b = _replica(prefix, "a"), _replica(prefix, "b")

    async def body() -> None:
        assert isinstance(a.lease, RedisLease)
        assert (a.replica, a.lease.replica) == ("a", "a")
        await a.create_model("m", b"{}")
        with pytest.raises(NotOwner):
            a.lease.holder("m")
        with pytest.raises(NotOwner):
            await a.append("m", 1, b"no lease yet")  # the store writes only under the lease
        assert await a.lease.acquire("m") is True  # newly taken: catch up first
        assert await a.lease.acquire("m") is False  # already held
        assert a.lease.holder("m").startswith("a:")
        await a.append("m", 1, b"one")
        with pytest.raises(NotOwner, match="replica a"):
            await b.lease.acquire("m")
        with pytest.raises(NotOwner):
            b.lease.holder("m")
        with pytest.raises(NotOwner):
            await b.append("m", 2, b"not b's to write")
        await a.lease.release("m")
        await a.lease.release("m")  # releasing what is not held does nothing
        with pytest.raises(NotOwner):
            await a.append("m", 2, b"released")
        assert await b.lease.acquire("m") is True
        assert int(b.lease.holder("m").rsplit(":", 1)[1]) > 1  # the fencing token went up
        await b.append("m", 2, b"two")
        with pytest.raises(NotOwner, match="replica b"):
            await a.lease.acquire("m")
        assert [r.record for r in await a.read_log("m")] == [b"one", b"two"]

    _replicas(a, b)(body)


def test_redis_lease_a_restarted_replica_takes_its_model_back_and_fences_the_old_one(
    redis_url: str,
) -> None:
    prefix = f"t{time.monotonic_ns()}:"
    old, new = _replica(prefix, "a"), _replica(prefix, "a")  # same stable replica id

    async def body() -> None:
        await old.create_model("m", b"{}")
        assert await old.lease.acquire("m")
        await old.append("m", 1, b"one")
        assert await new.lease.acquire("m") is True  # at once, no waiting out its own lease
        await new.append("m", 2, b"two")
        with pytest.raises(NotOwner):
            await old.append("m", 3, b"stale writer")  # the fence: the token moved on
        with pytest.raises(NotOwner):
            old.lease.holder("m")  # and the old one forgot its lease
        with pytest.raises(NotOwner):
            await old.put_snapshot("m", Snapshot(2, b"t", b"m"))
        assert [r.record for r in await new.read_log("m")] == [b"one", b"two"]
        assert await new.get_snapshot("m") is None

    _replicas(old, new)(body)


def test_redis_lease_is_renewed_while_used_and_released_when_idle(redis_url: str) -> None:
    prefix = f"t{time.monotonic_ns()}:"
    a, b = _replica(prefix, "a", lease_ms=300, idle_s=0.8), _replica(prefix, "b", lease_ms=300)

    async def body() -> None:
        await a.create_model("m", b"{}")
        assert await a.lease.acquire("m")
        for _ in range(6):  # 0.6 s, twice the lease: the renewer keeps it
            await asyncio.sleep(0.1)
            with pytest.raises(NotOwner):
                await b.lease.acquire("m")
        assert await a.lease.acquire("m") is False  # still held, not taken afresh
        deadline = time.monotonic() + 5
        while True:  # unused for idle_s: released, and b may take it
            try:
                assert await b.lease.acquire("m") is True
                break
            except NotOwner:
                assert time.monotonic() < deadline, "the idle lease was never released"
                await asyncio.sleep(0.1)
        with pytest.raises(NotOwner):
            a.lease.holder("m")

    _replicas(a, b)(body)


def test_redis_delete_forgets_the_lease_and_close_releases_it(redis_url: str) -> None:
    prefix = f"t{time.monotonic_ns()}:"
    a, b = _replica(prefix, "a"), _replica(prefix, "b")

    async def body() -> None:
        await a.create_model("m", b"{}")
        await a.create_model("n", b"{}")
        assert await a.lease.acquire("m")
        assert await a.lease.acquire("n")
        assert await a.delete_model("m")
        with pytest.raises(NotOwner):
            a.lease.holder("m")
        with pytest.raises(NotFound):  # no lease on a model the catalogue no longer has
            await b.lease.acquire("m")
        assert await b.create_model("m", b"{}")
        assert await b.lease.acquire("m")  # the lease key went with the model
        await a.lease.close()  # stops renewing, releases "n"
        assert await b.lease.acquire("n")

    _replicas(a, b)(body)
