"""One conformance suite for every store backend (the byte-level protocol of service.store.base).

Add a backend by adding a branch to ``_open`` and its name to ``BACKENDS``.
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
from redis_server import RedisServer

from service.errors import StoreUnavailable
from service.store import MemoryStore, RedisStore, Snapshot, SQLiteStore, Store

BACKENDS = ["memory", "sqlite", "redis"]
Body = Callable[[Store], Awaitable[None]]


_REDIS: dict[str, str] = {}


def _make(kind: str, tmp_path: Path, ttl: float = 3600.0) -> Store:
    if kind == "memory":
        return MemoryStore(ttl)
    if kind == "redis":
        # A fresh key prefix per test on the session's redis-server keeps tests independent.
        return RedisStore(_REDIS["url"], ttl, prefix=f"t{time.monotonic_ns()}:", lease_ms=5000)
    return SQLiteStore(tmp_path / "store.sqlite3", ttl)


def _run(kind: str, tmp_path: Path, body: Body, ttl: float = 3600.0) -> None:
    """Open a fresh store, run the test body in one event loop, close it.

    The Redis store writes a model only while it holds the model's lease, so the body's writes
    go through ``acquire`` first (a no-op for the single-process stores)."""

    async def main() -> None:
        store = _make(kind, tmp_path, ttl)
        await store.open()
        try:
            await body(_Leased(store))
        finally:
            await store.close()

    asyncio.run(main())


class _Leased:
    """Acquires a model's write lease before each append or snapshot, like the engine does."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def append(self, name: str, *args: object, **kw: object) -> None:
        await self._store.acquire(name)
        await self._store.append(name, *args, **kw)  # type: ignore[arg-type]

    async def put_snapshot(self, name: str, snapshot: Snapshot) -> None:
        await self._store.acquire(name)
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
        await s.append("a", 1, b"r1", "req", b"resp")
        await s.put_snapshot("a", Snapshot(1, b"t", b"m"))
        assert await s.delete_model("a")
        assert not await s.delete_model("a")
        assert await s.list_models() == {"b": b"{}"}
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


def test_stale_version_is_refused_atomically(kind: str, tmp_path: Path) -> None:
    async def body(s: Store) -> None:
        await s.create_model("m", b"{}")
        await s.append("m", 3, b"a", "first", b"answer-1")
        for stale in (3, 2):
            with pytest.raises((ValueError, StoreUnavailable)):
                await s.append("m", stale, b"b", "second", b"answer-2")
        assert [(r.version, r.record) for r in await s.read_log("m")] == [(3, b"a")]
        assert await s.get_response("m", "first") == b"answer-1"
        assert await s.get_response("m", "second") is None

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
