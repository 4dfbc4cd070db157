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
only grow, even past a trim): :class:`~service.errors.VersionConflict`.

Durability. An append is acknowledged when Redis has answered its script; what that survives
depends on the server's persistence (see the README's table). When ``wait_aof`` is on and the
server supports ``WAITAOF`` (Redis >= 7.2), the store also waits until the write is fsync'd to the
local AOF before acknowledging.

Group commit. ``append`` checks that this replica holds the lease, puts its script call on a queue
(before its first ``await``) and waits. One committer drains the queue: every call queued so far
goes out as one pipeline (one round trip; no MULTI), each still its own Lua script fenced by its
model's lease token, followed by one ``WAITAOF`` for the whole batch when it is in use. Redis runs
the scripts in order, and with ``appendfsync always`` fsyncs the AOF once before it answers the
batch. Each script's own refusal (NotOwner, VersionConflict) fails only its append; a connection
error or timeout fails every append of the batch with StoreUnavailable (then some of its scripts
may have run: the caller's catch-up reads the log back). Calls queued meanwhile make the next
batch. Each caller's ``append`` returns, or raises, only after the answer to its batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import NotOwner, PostserveError, StoreUnavailable, VersionConflict
from service.store.base import LogRecord, Snapshot
from service.store.redis_lease import RedisLease

__all__ = ["RedisStore"]

log = logging.getLogger("postserve.store.redis")

# KEYS[1] - lease key
# KEYS[2] - log stream
# KEYS[3] - request record key (unused when ARGV[4] is empty)
# KEYS[4] - snapshot hash (read only when ARGV[7] is set and the stream is empty)
# ARGV[1] - the writer's lease value, ``{replica}:{token}``
# ARGV[2] - the model's version after the record (the entry id is ``{version}-1``)
# ARGV[3] - record bytes
# ARGV[4] - "1" to also keep the request record, "" not to
# ARGV[5] - response bytes for the request record
# ARGV[6] - the request record's time to live in milliseconds
# ARGV[7] - the version the record follows ("" for any lower one): the log's latest version (its
#           top entry, else the snapshot's version, else 0) must be exactly this
# KEYS[5..], ARGV[8..] - further request record keys and their responses (one log record that
#           answers several requests: a batch of rewards), kept as long
# return 1 once written; a POSTSERVE_NOT_OWNER error (nothing written) if the lease is not the
# writer's; POSTSERVE_NOT_AFTER {latest} (nothing written) if the log is not at ARGV[7]; XADD's
# own error (nothing written) for a version at or below the stream's top
_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('POSTSERVE_NOT_OWNER')
end
if ARGV[7] ~= '' then
  local latest = 0
  local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #top > 0 then
    latest = tonumber(string.match(top[1][1], '^(%d+)'))
  else
    local snap = redis.call('HGET', KEYS[4], 'version')
    if snap then latest = tonumber(snap) end
  end
  if latest ~= tonumber(ARGV[7]) then
    return redis.error_reply('POSTSERVE_NOT_AFTER ' .. latest)
  end
end
redis.call('XADD', KEYS[2], ARGV[2] .. '-1', 'r', ARGV[3])
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
end
for i = 5, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 3], 'PX', ARGV[6])
end
return 1
"""

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

# KEYS[1] - event hash
# KEYS[2] - the model's sorted set of pending events
# ARGV[1] - expiry (unix seconds, as text)
# ARGV[2] - record bytes
# ARGV[3] - the event hash's time to live in milliseconds (the expiry plus a grace period)
# ARGV[4] - event id
# return 1 if the event was kept, 0 (and no change) if its id exists
_PUT_EVENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'r', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[4])
return 1
"""

#: How long an event's record outlives its expiry, so that a default reward can still read it.
_EVENT_GRACE_S = 86400.0


@dataclass
class _Append:
    """One queued append: its script's keys and arguments, and the future its caller waits on."""

    name: str
    version: int
    keys: list[str]
    args: list[Any]
    done: asyncio.Future[None]


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
        self._use_waitaof = False
        self._probed = False
        self._queue: list[_Append] = []
        self._committer: asyncio.Task[None] | None = None
        self.commits = 0  # batches sent (pipelines), for tests and benchmarks

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
        self._append_sha = self._r.register_script(_APPEND).sha
        self._snapshot = self._r.register_script(_SNAPSHOT)
        self._put_event = self._r.register_script(_PUT_EVENT)
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

    async def close(self) -> None:
        """Send what is queued, close the lease (stop renewing, release what it holds), then
        the connection."""
        if self._committer is not None:
            await asyncio.shield(self._committer)
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
        holder = self.lease.holder(name)
        with_request = request_id is not None and response is not None
        keys = [
            self._k("lease", name),
            self._k("log", name),
            self._k("req", name, request_id or ""),
            self._k("snap", name),
        ]
        args: list[Any] = [
            holder,
            version,
            record,
            "1" if with_request else "",
            response or b"",
            self._ttl_ms,
            "" if after is None else after,
        ]
        for rid, answer in requests:
            keys.append(self._k("req", name, rid))
            args.append(answer)
        done = asyncio.get_running_loop().create_future()
        self._queue.append(_Append(name, version, keys, args, done))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_queued())
        await done

    async def _commit_queued(self) -> None:
        """Send batches until the queue is empty; each batch is what was queued while the
        previous one was in flight."""
        batch: list[_Append] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    outcomes = await self._commit(batch)
                except Exception as exc:  # unreachable, refused, or anything else: all fail
                    message = exc.message if isinstance(exc, PostserveError) else f"redis: {exc}"
                    outcomes = [StoreUnavailable(message) for _ in batch]
                for a, outcome in zip(batch, outcomes, strict=True):
                    if a.done.done():  # its caller gave up; the outcome stands regardless
                        continue
                    if outcome is None:
                        a.done.set_result(None)
                    else:
                        a.done.set_exception(outcome)
        finally:  # the queue is empty, unless this task was cancelled: nobody may wait forever
            self._committer = None
            for a in [*batch, *self._queue]:
                if not a.done.done():
                    a.done.set_exception(StoreUnavailable("the redis store stopped committing"))
            self._queue = []

    async def _commit(self, batch: list[_Append]) -> list[PostserveError | None]:
        """One pipeline of the batch's scripts (and WAITAOF); per append None or its refusal."""
        self.commits += 1
        if not self._probed:
            await self._probe()
        results = await self._pipeline(batch)
        if any(isinstance(r, NoScriptError) for r in results):  # a restarted server: load, redo
            self._append_sha = await self._do(self.r.script_load(_APPEND))
            redo = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            for i, r in zip(redo, await self._pipeline([batch[i] for i in redo]), strict=True):
                results[i] = r
        return [self._outcome(a, r) for a, r in zip(batch, results, strict=True)]

    async def _pipeline(self, batch: list[_Append]) -> list[Any]:
        """The batch's scripts in one round trip: each one's result, or its error. With WAITAOF
        (the last command: Redis answers it once the batch is fsync'd to its AOF), a script that
        wrote but whose fsync was not confirmed in time is StoreUnavailable."""
        pipe = self.r.pipeline(transaction=False)
        for a in batch:
            pipe.evalsha(self._append_sha, len(a.keys), *a.keys, *a.args)
        if self._use_waitaof:
            pipe.execute_command("WAITAOF", 1, 0, int(self._timeout * 1000))
        results = list(await self._do(pipe.execute(raise_on_error=False)))
        if not self._use_waitaof:
            return results
        waited, results = results[-1], results[:-1]
        if isinstance(waited, Exception) or int(waited[0]) < 1:
            unconfirmed = StoreUnavailable(f"redis did not confirm the AOF fsync: {waited}")
            results = [r if isinstance(r, Exception) else unconfirmed for r in results]
        return results

    def _outcome(self, a: _Append, result: Any) -> PostserveError | None:
        if isinstance(result, PostserveError):
            return type(result)(result.message)
        if not isinstance(result, Exception):
            return None
        message = str(result)
        if "POSTSERVE_NOT_OWNER" in message:
            self.lease.forget(a.name)
            return NotOwner(f"this replica lost the lease of model {a.name!r}")
        if "POSTSERVE_NOT_AFTER" in message:
            latest = message.rsplit(" ", 1)[-1]
            return VersionConflict(
                f"the log of {a.name!r} is at version {latest}, but the record of version "
                f"{a.version} follows version {a.args[6]}; nothing was written"
            )
        if "equal or smaller than the target stream top item" in message:
            return VersionConflict(
                f"the log of {a.name!r} is already at version {a.version} or past it; "
                "nothing was written"
            )
        return StoreUnavailable(f"redis refused the append to {a.name!r}: {message}")

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

    # -- events ------------------------------------------------------------------------------

    async def put_event(self, name: str, event_id: str, record: bytes, expires_at: float) -> bool:
        life_ms = max(1, int((expires_at - time.time() + _EVENT_GRACE_S) * 1000))
        keys = [self._k("event", name, event_id), self._k("events", name)]
        args: list[bytes | str | int] = [repr(expires_at), record, life_ms, event_id]
        return bool(await self._do(self._put_event(keys=keys, args=args)))

    async def get_event(self, name: str, event_id: str) -> bytes | None:
        expires, record = await self._do(self.r.hmget(self._k("event", name, event_id), ["e", "r"]))
        if expires is None or float(expires) <= time.time():
            return None
        return bytes(record)

    async def settle_event(self, name: str, event_id: str) -> None:
        await self._do(self.r.zrem(self._k("events", name), event_id))

    async def put_events(
        self, name: str, events: Sequence[tuple[str, bytes]], expires_at: float
    ) -> list[bool]:
        """One pipelined round trip of ``put_event`` scripts (each atomic on its own)."""
        life_ms = max(1, int((expires_at - time.time() + _EVENT_GRACE_S) * 1000))
        pipe = self.r.pipeline(transaction=False)
        for event_id, record in events:
            keys = [self._k("event", name, event_id), self._k("events", name)]
            args: list[bytes | str | int] = [repr(expires_at), record, life_ms, event_id]
            await self._put_event(keys=keys, args=args, client=pipe)  # queued, not sent
        return [bool(done) for done in await self._do(pipe.execute())]

    async def get_events(self, name: str, event_ids: Sequence[str]) -> list[bytes | None]:
        pipe = self.r.pipeline(transaction=False)
        for event_id in event_ids:
            pipe.hmget(self._k("event", name, event_id), ["e", "r"])
        now = time.time()
        return [
            None if expires is None or float(expires) <= now else bytes(record)
            for expires, record in await self._do(pipe.execute())
        ]

    async def settle_events(self, name: str, event_ids: Sequence[str]) -> None:
        if event_ids:
            await self._do(self.r.zrem(self._k("events", name), *event_ids))

    async def expired_events(
        self, name: str, now: float, limit: int = 100
    ) -> list[tuple[str, bytes]]:
        ids = await self._do(
            self.r.zrangebyscore(self._k("events", name), "-inf", now, start=0, num=limit)
        )
        out: list[tuple[str, bytes]] = []
        for raw_id in ids:
            event_id = raw_id.decode()
            record = await self._do(self.r.hget(self._k("event", name, event_id), "r"))
            if record is None:  # outlived its grace period: nothing left to reward
                await self.settle_event(name, event_id)
            else:
                out.append((event_id, bytes(record)))
        return out
