"""An in-process store: for tests and ephemeral runs (nothing survives the process).

Nothing to make durable, so there is nothing to batch: ``append`` checks and writes its record,
with its request records, at once, before its first (and only) suspension point, which keeps the
protocol's order. Each model's events are also kept in a heap by expiry, so that the expiry
ticker's ``expired_events`` costs what has expired, not a scan of every event held.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence

from service.store.base import LogRecord, Snapshot, refusal

__all__ = ["MemoryStore"]


def _kept(raw: bytes) -> bytes:
    """``raw`` in an allocation of its own size: orjson's bytes keep the whole 4 KiB buffer they
    were written into (4 KiB a record, 60x a small record, for as long as it is kept)."""
    return bytes(memoryview(raw))


class MemoryStore:
    def __init__(self, idempotency_ttl_s: float = 86400.0) -> None:
        self._ttl = idempotency_ttl_s
        self._models: dict[str, bytes] = {}
        self._logs: dict[str, list[LogRecord]] = {}
        self._requests: dict[tuple[str, str], tuple[float, bytes]] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._events: dict[tuple[str, str], _Event] = {}
        self._expiry: dict[str, list[tuple[float, str]]] = {}  # per model: (expires_at, id) heap

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def create_model(self, name: str, spec: bytes) -> bool:
        if name in self._models:
            return False
        self._models[name] = spec
        self._logs[name] = []
        return True

    async def delete_model(self, name: str) -> bool:
        if self._models.pop(name, None) is None:
            return False
        self._logs.pop(name, None)
        self._snapshots.pop(name, None)
        for key in [k for k in self._requests if k[0] == name]:
            del self._requests[key]
        for ekey in [k for k in self._events if k[0] == name]:
            del self._events[ekey]
        self._expiry.pop(name, None)
        return True

    async def list_models(self) -> dict[str, bytes]:
        return dict(self._models)

    async def get_model(self, name: str) -> bytes | None:
        return self._models.get(name)

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
        log = self._logs.setdefault(name, [])
        snap = self._snapshots.get(name)  # versions up to it may have been trimmed
        latest = max([r.version for r in log[-1:]] + ([snap.version] if snap else []), default=None)
        refused = refusal(name, version, after, latest)
        if refused is not None:
            raise refused
        log.append(LogRecord(version, _kept(record)))
        now = time.time()
        if request_id is not None and response is not None:
            self._requests[(name, request_id)] = (now, _kept(response))
        for rid, answer in requests:
            self._requests[(name, rid)] = (now, _kept(answer))

    async def read_log(self, name: str, after: int = 0) -> list[LogRecord]:
        return [r for r in self._logs.get(name, []) if r.version > after]

    async def get_response(self, name: str, request_id: str) -> bytes | None:
        hit = self._requests.get((name, request_id))
        if hit is None or time.time() - hit[0] > self._ttl:
            return None
        return hit[1]

    async def get_responses(self, name: str, request_ids: Sequence[str]) -> list[bytes | None]:
        return [await self.get_response(name, rid) for rid in request_ids]

    async def put_snapshot(self, name: str, snapshot: Snapshot) -> None:
        self._snapshots[name] = snapshot
        self._logs[name] = [r for r in self._logs.get(name, []) if r.version > snapshot.version]

    async def get_snapshot(self, name: str) -> Snapshot | None:
        return self._snapshots.get(name)

    async def put_event(self, name: str, event_id: str, record: bytes, expires_at: float) -> bool:
        if (name, event_id) in self._events:
            return False
        self._events[(name, event_id)] = (expires_at, _kept(record), True)
        heapq.heappush(self._expiry.setdefault(name, []), (expires_at, event_id))
        return True

    async def get_event(self, name: str, event_id: str) -> bytes | None:
        hit = self._events.get((name, event_id))
        return None if hit is None or hit[0] <= time.time() else hit[1]

    async def settle_event(self, name: str, event_id: str) -> None:
        hit = self._events.get((name, event_id))
        if hit is not None:
            self._events[(name, event_id)] = (hit[0], hit[1], False)

    async def put_events(
        self, name: str, events: Sequence[tuple[str, bytes]], expires_at: float
    ) -> list[bool]:
        return [await self.put_event(name, e, record, expires_at) for e, record in events]

    async def get_events(self, name: str, event_ids: Sequence[str]) -> list[bytes | None]:
        return [await self.get_event(name, e) for e in event_ids]

    async def settle_events(self, name: str, event_ids: Sequence[str]) -> None:
        for e in event_ids:
            await self.settle_event(name, e)

    async def expired_events(
        self, name: str, now: float, limit: int = 100
    ) -> list[tuple[str, bytes]]:
        heap = self._expiry.get(name, [])
        due: list[tuple[float, str, bytes]] = []
        while heap and heap[0][0] <= now and len(due) < limit:  # oldest first
            expires_at, event_id = heapq.heappop(heap)
            ev = self._events.get((name, event_id))
            if ev is None or ev[0] != expires_at:  # gone, or a later event of that id
                continue
            if ev[2]:  # pending
                due.append((expires_at, event_id, ev[1]))
            else:
                del self._events[(name, event_id)]
        for expires_at, event_id, _ in due:  # due until settled: the next call sees them again
            heapq.heappush(heap, (expires_at, event_id))
        return [(event_id, record) for _, event_id, record in due]


#: An event kept: (expires_at, record, pending), a plain tuple of atoms, which the cyclic
#: collector stops tracking (a class instance, even a NamedTuple, stays tracked, and a store of a
#: million events was walked by every full collection of the server).
_Event = tuple[float, bytes, bool]
