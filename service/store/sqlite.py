"""The embedded default store: one SQLite file in WAL mode with ``synchronous=FULL``.

Every write is one transaction; ``append`` returns after the commit, which in WAL mode with
synchronous=FULL has fsync'd the write-ahead log: an acknowledged update survives a crash of the
process or of the machine. All SQLite calls run on one dedicated thread (one connection), off the
event loop.

Group commit. ``append`` puts its record (with the request records it answers: one, or one per
event of a reward batch) on a queue (before its first ``await``: ``service.store.group``) and
waits. One committer drains the queue: it takes every record queued so far and writes them in one
transaction, one commit, one fsync, on the SQLite thread; the records that arrive meanwhile make
the next batch. In the transaction each record is checked against its model's latest version as
the batch has left it (the base protocol's ``refusal``) before it and its request records are
written, so a refused record fails alone (VersionConflict, none of its request records written)
and the others commit. An SQLite error (the file locked past ``timeout_s``, the disk full, the
store closed) rolls the whole transaction back and fails every append of the batch with
StoreUnavailable: nothing of it is written. Each caller's ``append`` returns, or raises, only
after the commit that held its record.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from service.errors import PostserveError, StoreUnavailable
from service.store.base import LogRecord, Snapshot, refusal
from service.store.group import GroupCommit

__all__ = ["SQLiteStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, spec BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS log (
    name TEXT NOT NULL, version INTEGER NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS requests (
    name TEXT NOT NULL, request_id TEXT NOT NULL, created REAL NOT NULL, response BLOB NOT NULL,
    PRIMARY KEY (name, request_id));
CREATE TABLE IF NOT EXISTS snapshots (
    name TEXT PRIMARY KEY, version INTEGER NOT NULL, tensors BLOB NOT NULL, meta BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    name TEXT NOT NULL, event_id TEXT NOT NULL, expires_at REAL NOT NULL, record BLOB NOT NULL,
    pending INTEGER NOT NULL, PRIMARY KEY (name, event_id));
CREATE INDEX IF NOT EXISTS events_due ON events (name, pending, expires_at);
"""


_LATEST = (
    "SELECT MAX(v) FROM (SELECT MAX(version) AS v FROM log WHERE name = ? "
    "UNION ALL SELECT version FROM snapshots WHERE name = ?)"
)


@dataclass
class _Append:
    """One queued append."""

    name: str
    version: int
    record: bytes
    answers: list[tuple[str, bytes]]  # (request_id, response) of each request it answers
    after: int | None


class SQLiteStore:
    """``timeout_s``: how long a write waits for a lock held by another connection."""

    def __init__(
        self, path: str | Path, idempotency_ttl_s: float = 86400.0, *, timeout_s: float = 5.0
    ) -> None:
        self._path = Path(path)
        self._ttl = idempotency_ttl_s
        self._timeout = timeout_s
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="postserve-sqlite")
        self._batches = GroupCommit(self._commit, "sqlite")

    @property
    def commits(self) -> int:
        """Batches committed (or attempted), for tests and benchmarks."""
        return self._batches.commits

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._db is None:
                raise StoreUnavailable("the sqlite store is not open")
            try:
                with self._db:  # one transaction: commit on success, roll back on error
                    return fn(self._db)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"sqlite: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def open(self) -> None:
        def connect() -> None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self._path, timeout=self._timeout, check_same_thread=False, isolation_level=None
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            db.isolation_level = "DEFERRED"
            self._db = db

        await asyncio.get_running_loop().run_in_executor(self._pool, connect)

    async def close(self) -> None:
        """Commit what is queued, then close the connection."""
        await self._batches.close()

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, shut)

    async def ping(self) -> bool:
        try:
            await self._run(lambda db: db.execute("SELECT 1").fetchone())
        except StoreUnavailable:
            return False
        return True

    async def create_model(self, name: str, spec: bytes) -> bool:
        def go(db: sqlite3.Connection) -> bool:
            cur = db.execute("INSERT OR IGNORE INTO models VALUES (?, ?)", (name, spec))
            return cur.rowcount == 1

        return await self._run(go)

    async def delete_model(self, name: str) -> bool:
        def go(db: sqlite3.Connection) -> bool:
            cur = db.execute("DELETE FROM models WHERE name = ?", (name,))
            for table in ("log", "requests", "snapshots", "events"):
                db.execute(f"DELETE FROM {table} WHERE name = ?", (name,))
            return cur.rowcount == 1

        return await self._run(go)

    async def list_models(self) -> dict[str, bytes]:
        rows = await self._run(lambda db: db.execute("SELECT name, spec FROM models").fetchall())
        return {name: bytes(spec) for name, spec in rows}

    async def get_model(self, name: str) -> bytes | None:
        def go(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT spec FROM models WHERE name = ?", (name,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(go)

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
        answers = list(requests)
        if request_id is not None and response is not None:
            answers.insert(0, (request_id, response))
        await self._batches.submit(_Append(name, version, record, answers, after))

    async def _commit(self, batch: list[_Append]) -> list[PostserveError | None]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: _write(self._db, batch))

    async def read_log(self, name: str, after: int = 0) -> list[LogRecord]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT version, record FROM log WHERE name = ? AND version > ? ORDER BY version",
                (name, after),
            ).fetchall()
        )
        return [LogRecord(v, bytes(r)) for v, r in rows]

    async def get_response(self, name: str, request_id: str) -> bytes | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT response FROM requests WHERE name = ? AND request_id = ? AND created > ?",
                (name, request_id, time.time() - self._ttl),
            ).fetchone()
        )
        return None if row is None else bytes(row[0])

    async def get_responses(self, name: str, request_ids: Sequence[str]) -> list[bytes | None]:
        def go(db: sqlite3.Connection) -> list[bytes | None]:
            since = time.time() - self._ttl
            rows = [
                db.execute(
                    "SELECT response FROM requests WHERE name = ? AND request_id = ? "
                    "AND created > ?",
                    (name, rid, since),
                ).fetchone()
                for rid in request_ids
            ]
            return [None if r is None else bytes(r[0]) for r in rows]

        return await self._run(go)

    async def put_snapshot(self, name: str, snapshot: Snapshot) -> None:
        def go(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?)",
                (name, snapshot.version, snapshot.tensors, snapshot.meta),
            )
            db.execute("DELETE FROM log WHERE name = ? AND version <= ?", (name, snapshot.version))
            db.execute("DELETE FROM requests WHERE created < ?", (time.time() - self._ttl,))

        await self._run(go)

    async def get_snapshot(self, name: str) -> Snapshot | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT version, tensors, meta FROM snapshots WHERE name = ?", (name,)
            ).fetchone()
        )
        return None if row is None else Snapshot(int(row[0]), bytes(row[1]), bytes(row[2]))

    async def put_event(self, name: str, event_id: str, record: bytes, expires_at: float) -> bool:
        def go(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, 1)",
                (name, event_id, expires_at, record),
            )
            return cur.rowcount == 1

        return await self._run(go)

    async def get_event(self, name: str, event_id: str) -> bytes | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT record FROM events WHERE name = ? AND event_id = ? AND expires_at > ?",
                (name, event_id, time.time()),
            ).fetchone()
        )
        return None if row is None else bytes(row[0])

    async def settle_event(self, name: str, event_id: str) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE events SET pending = 0 WHERE name = ? AND event_id = ?", (name, event_id)
            )
        )

    async def put_events(
        self, name: str, events: Sequence[tuple[str, bytes]], expires_at: float
    ) -> list[bool]:
        def go(db: sqlite3.Connection) -> list[bool]:
            sql = "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, 1)"
            return [db.execute(sql, (name, e, expires_at, r)).rowcount == 1 for e, r in events]

        return await self._run(go)

    async def get_events(self, name: str, event_ids: Sequence[str]) -> list[bytes | None]:
        def go(db: sqlite3.Connection) -> list[bytes | None]:
            now = time.time()
            sql = "SELECT record FROM events WHERE name = ? AND event_id = ? AND expires_at > ?"
            rows = [db.execute(sql, (name, e, now)).fetchone() for e in event_ids]
            return [None if r is None else bytes(r[0]) for r in rows]

        return await self._run(go)

    async def settle_events(self, name: str, event_ids: Sequence[str]) -> None:
        await self._run(
            lambda db: db.executemany(
                "UPDATE events SET pending = 0 WHERE name = ? AND event_id = ?",
                [(name, e) for e in event_ids],
            )
        )

    async def expired_events(
        self, name: str, now: float, limit: int = 100
    ) -> list[tuple[str, bytes]]:
        def go(db: sqlite3.Connection) -> list[tuple[str, bytes]]:
            db.execute(
                "DELETE FROM events WHERE name = ? AND pending = 0 AND expires_at <= ?", (name, now)
            )
            rows = db.execute(
                "SELECT event_id, record FROM events WHERE name = ? AND pending = 1 "
                "AND expires_at <= ? ORDER BY expires_at LIMIT ?",
                (name, now, limit),
            ).fetchall()
            return [(str(e), bytes(r)) for e, r in rows]

        return await self._run(go)


def _write(db: sqlite3.Connection | None, batch: list[_Append]) -> list[PostserveError | None]:
    """On the SQLite thread: the batch in one transaction; per append None (written) or its
    refusal; a failed commit fails them all and writes nothing."""
    if db is None:
        return [StoreUnavailable("the sqlite store is not open") for _ in batch]
    outcomes: list[PostserveError | None] = []
    latest: dict[str, int | None] = {}  # each model's latest version, as the batch leaves it
    now = time.time()
    logs: list[tuple[str, int, bytes]] = []
    requests: list[tuple[str, str, float, bytes]] = []
    try:
        with db:  # one transaction: commit (one fsync) on success, roll back on error
            for a in batch:
                if a.name not in latest:
                    latest[a.name] = db.execute(_LATEST, (a.name, a.name)).fetchone()[0]
                refused = refusal(a.name, a.version, a.after, latest[a.name])
                outcomes.append(refused)
                if refused is None:
                    logs.append((a.name, a.version, a.record))
                    requests += [(a.name, rid, now, answer) for rid, answer in a.answers]
                    latest[a.name] = a.version
            # the batch's rows in two statements: per-row statements cost more than the rows
            db.executemany("INSERT INTO log VALUES (?, ?, ?)", logs)
            db.executemany("INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?)", requests)
    except sqlite3.Error as exc:
        return [
            StoreUnavailable(f"sqlite: {exc}; nothing of this commit was written") for _ in batch
        ]
    return outcomes
