"""The Redis store: catalogue, snapshots, a Stream per model log, events; writes fenced by a lease.

=====================================  =========================================================
key                                    contents
=====================================  =========================================================
``{p}models``                          hash: model name -> spec bytes
``{p}log:{name}``                      stream; entry id ``{version}-1``, field ``r`` = record
``{p}snap:{name}``                     hash: ``version``, ``tensors``, ``meta`` (one HSET)
``{p}req:{name}:{request_id}``         the first response, expiring after the idempotency TTL
``{p}lease:{name}``                    ``{replica}:{token}`` of the one replica that may write,
                                       expiring after ``lease_ms`` unless renewed (the lease,
                                       ``service.store.redis_lease``)
``{p}fence:{name}``                    counter; each new lease takes the next token (the lease)
``{p}event:{name}:{event_id}``         hash ``e`` (expiry, unix s), ``r`` (record); the key lives
                                       a day past the expiry (for default rewards)
``{p}events:{name}``                   sorted set of pending event ids by expiry
=====================================  =========================================================

One writer per model: who that is, is the business of the store's lease
(:class:`~service.store.redis_lease.RedisLease`, ``store.lease``; taken, renewed and released
there). Every log append and snapshot runs as a Lua script that first compares the lease key
with the writer's own ``replica:token`` (``lease.holder(name)``) and writes nothing if they
differ (:class:`~service.errors.NotOwner`): a replica that lost its lease cannot write, even if
it still believes it owns the model. A stale version is refused by the Stream itself (entry ids
only grow, even past a trim): :class:`~service.errors.VersionConflict`; so is a record whose
``after`` is not the log's latest version.

Durability. An append is acknowledged when Redis has answered its script; what that survives
depends on the server's persistence (see the README's table). When ``wait_aof`` is on and the
server supports ``WAITAOF`` (Redis >= 7.2), the store also waits until the write is fsync'd to the
local AOF before acknowledging.

The store is composed of three parts on one connection: the lease, the appends
(:class:`~service.store.redis_commit.RedisCommitter`: group commit, one pipeline of fenced
scripts and one ``WAITAOF`` per batch of appends in flight together) and the events
(:class:`~service.store.redis_events.RedisEvents`); the store's own methods are the Store
protocol's, delegating to them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import NotOwner, StoreUnavailable
from service.store.base import LogRecord, Snapshot
from service.store.redis_commit import RedisCommitter
from service.store.redis_events import RedisEvents
from service.store.redis_lease import RedisLease

__all__ = ["RedisStore"]

log = logging.getLogger("postserve.store.redis")

# KEYS[1] - lease key
# KEYS[2] - snapshot hash
# KEYS[3] - log stream
# ARGV[1] - the writer's lease value, ``{replica}:{token}``
# ARGV[2] - the snapshot's version (log entries at or below it are trimmed)
# ARGV[3] - tensors (safetensors bytes)
# ARGV[4] - meta (JSON bytes)
# return 1 once written; a POSTSERVE_NOT_OWNER error (nothing written) if the lease is not the
# writer's
_SNAPSHOT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('POSTSERVE_NOT_OWNER')
end
redis.call('HSET', KEYS[2], 'version', ARGV[2], 'tensors', ARGV[3], 'meta', ARGV[4])
redis.call('XTRIM', KEYS[3], 'MINID', tostring(tonumber(ARGV[2]) + 1) .. '-0')
return 1
"""


class RedisStore:
    def __init__(
        self,
        url: str,
        idempotency_ttl_s: float = 86400.0,
        *,
        lease_ms: int = 10_000,
        wait_aof: Literal["auto", "off"] = "auto",
        prefix: str = "postserve:",
        replica: str | None = None,
        timeout_s: float = 2.0,
        idle_s: float = 120.0,
    ) -> None:
        self._url, self._ttl_ms = url, max(1, int(idempotency_ttl_s * 1000))
        self._wait_aof, self._p = wait_aof, prefix
        self._timeout = timeout_s
        self._r: aioredis.Redis | None = None
        self.lease = RedisLease(
            lambda: self.r, self._k, self._do, replica=replica, lease_ms=lease_ms, idle_s=idle_s
        )
        self.replica = self.lease.replica
        self._appends = RedisCommitter(
            lambda: self.r,
            self._k,
            self._do,
            self.lease,
            self._waitaof,
            ttl_ms=self._ttl_ms,
            timeout_s=timeout_s,
        )
        self._events = RedisEvents(lambda: self.r, self._k, self._do)
        self._use_waitaof = False
        self._probed = False

    @property
    def commits(self) -> int:
        """Batches of appends sent (pipelines), for tests and benchmarks."""
        return self._appends.commits

    # -- plumbing ----------------------------------------------------------------------------

    @property
    def r(self) -> aioredis.Redis:
        if self._r is None:
            raise StoreUnavailable("the redis store is not open")
        return self._r

    def _k(self, *parts: str) -> str:
        return self._p + ":".join(parts)

    async def _do(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis unreachable: {exc}") from exc
        except ResponseError:
            raise  # a refused command (fence, stale id): the caller decides what it means
        except RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def open(self) -> None:
        self._r = aioredis.from_url(
            self._url,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            health_check_interval=5,
        )
        self._snapshot = self._r.register_script(_SNAPSHOT)
        self._appends.start()
        self._events.start()
        await self.lease.start()
        try:
            await self._probe()
        except StoreUnavailable as exc:  # not fatal: the engine retries until Redis answers
            log.warning("redis not reachable yet: %s", exc)

    async def _probe(self) -> None:
        """Learn the server's version once (whether WAITAOF exists)."""
        info = await self._do(self.r.info("server"))
        version = tuple(int(v) for v in str(info.get("redis_version", "0")).split(".")[:2])
        self._use_waitaof = self._wait_aof == "auto" and version >= (7, 2)
        self._probed = True
        log.info(
            "redis %s, replica %s, WAITAOF %s",
            info.get("redis_version"),
            self.replica,
            "on" if self._use_waitaof else "off",
        )

    async def _waitaof(self) -> bool:
        """Whether appends wait for ``WAITAOF`` (probing the server first, once)."""
        if not self._probed:
            await self._probe()
        return self._use_waitaof

    async def close(self) -> None:
        """Send what is queued, close the lease (stop renewing, release what it holds), then
        the connection."""
        await self._appends.close()
        await self.lease.close()
        if self._r is not None:
            await self._r.aclose()
            self._r = None

    async def ping(self) -> bool:
        try:
            return bool(await self._do(self.r.ping()))
        except StoreUnavailable:
            return False

    async def _fenced(self, script: Any, keys: list[str], args: list[Any], name: str) -> None:
        try:
            await self._do(script(keys=keys, args=args))
        except ResponseError as exc:
            self.lease.forget(name)
            raise NotOwner(f"this replica lost the lease of model {name!r}") from exc

    # -- catalogue ---------------------------------------------------------------------------

    async def create_model(self, name: str, spec: bytes) -> bool:
        return bool(await self._do(self.r.hsetnx(self._k("models"), name, spec)))

    async def delete_model(self, name: str) -> bool:
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self._k("models"), name)
        pipe.delete(self._k("log", name), self._k("snap", name), self._k("lease", name))
        removed = (await self._do(pipe.execute()))[0]
        for pattern in (self._k("req", name, "*"), self._k("event", name, "*")):
            async for key in self.r.scan_iter(match=pattern, count=1000):
                await self._do(self.r.delete(key))
        await self._do(self.r.delete(self._k("events", name)))
        self.lease.forget(name)
        return bool(removed)

    async def list_models(self) -> dict[str, bytes]:
        raw = await self._do(self.r.hgetall(self._k("models")))
        return {k.decode(): bytes(v) for k, v in raw.items()}

    async def get_model(self, name: str) -> bytes | None:
        raw = await self._do(self.r.hget(self._k("models"), name))
        return None if raw is None else bytes(raw)

    # -- log ---------------------------------------------------------------------------------

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
        """Group committed (``service.store.redis_commit``): one fenced script, in one pipeline
        with the appends in flight together."""
        answers = list(requests)
        if request_id is not None and response is not None:
            answers.insert(0, (request_id, response))
        await self._appends.append(name, version, record, answers, after)

    async def read_log(self, name: str, after: int = 0) -> list[LogRecord]:
        out: list[LogRecord] = []
        start = f"{after + 1}-0"
        while True:
            batch = await self._do(self.r.xrange(self._k("log", name), min=start, count=1000))
            for entry_id, fields in batch:
                out.append(LogRecord(int(entry_id.split(b"-")[0]), bytes(fields[b"r"])))
            if len(batch) < 1000:
                return out
            last = int(batch[-1][0].split(b"-")[0])
            start = f"{last + 1}-0"

    async def get_response(self, name: str, request_id: str) -> bytes | None:
        raw = await self._do(self.r.get(self._k("req", name, request_id)))
        return None if raw is None else bytes(raw)

    async def get_responses(self, name: str, request_ids: Sequence[str]) -> list[bytes | None]:
        if not request_ids:
            return []
        raw = await self._do(self.r.mget([self._k("req", name, rid) for rid in request_ids]))
        return [None if v is None else bytes(v) for v in raw]

    # -- snapshots ---------------------------------------------------------------------------

    async def put_snapshot(self, name: str, snapshot: Snapshot) -> None:
        holder = self.lease.holder(name)
        keys = [self._k("lease", name), self._k("snap", name), self._k("log", name)]
        args = [holder, snapshot.version, snapshot.tensors, snapshot.meta]
        await self._fenced(self._snapshot, keys, args, name)

    async def get_snapshot(self, name: str) -> Snapshot | None:
        raw = await self._do(self.r.hgetall(self._k("snap", name)))
        if not raw:
            return None
        return Snapshot(int(raw[b"version"]), bytes(raw[b"tensors"]), bytes(raw[b"meta"]))

    # -- events (``service.store.redis_events``) -------------------------------------------

    async def put_event(self, name: str, event_id: str, record: bytes, expires_at: float) -> bool:
        return await self._events.put_event(name, event_id, record, expires_at)

    async def get_event(self, name: str, event_id: str) -> bytes | None:
        return await self._events.get_event(name, event_id)

    async def settle_event(self, name: str, event_id: str) -> None:
        await self._events.settle_event(name, event_id)

    async def put_events(
        self, name: str, events: Sequence[tuple[str, bytes]], expires_at: float
    ) -> list[bool]:
        return await self._events.put_events(name, events, expires_at)

    async def get_events(self, name: str, event_ids: Sequence[str]) -> list[bytes | None]:
        return await self._events.get_events(name, event_ids)

    async def settle_events(self, name: str, event_ids: Sequence[str]) -> None:
        await self._events.settle_events(name, event_ids)

    async def expired_events(
        self, name: str, now: float, limit: int = 100
    ) -> list[tuple[str, bytes]]:
        return await self._events.expired_events(name, now, limit)
