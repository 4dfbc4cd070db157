"""The Redis store: catalogue, snapshots, a Stream per model log, leases with fencing tokens.

=====================================  =========================================================
key                                    contents
=====================================  =========================================================
``{p}models``                          hash: model name -> spec bytes
``{p}log:{name}``                      stream; entry id ``{version}-1``, field ``r`` = record
``{p}snap:{name}``                     hash: ``version``, ``tensors``, ``meta`` (one HSET)
``{p}req:{name}:{request_id}``         the first response, expiring after the idempotency TTL
``{p}lease:{name}``                    ``{replica}:{token}`` of the one replica that may write,
                                       expiring after ``lease_ms`` unless renewed
``{p}fence:{name}``                    counter; each new lease takes the next token
``{p}event:{name}:{event_id}``         hash ``e`` (expiry, unix s), ``r`` (record); the key lives
                                       a day past the expiry (for default rewards)
``{p}events:{name}``                   sorted set of pending event ids by expiry
=====================================  =========================================================

One writer per model. A replica writes a model only while it holds the model's lease (taken
when the key is free, or when it names this same replica: a restarted pod with a stable
``POSTSERVE_REPLICA_ID`` takes its model back at once instead of waiting out its own lease; two
live processes must never share an id), renewed in the background every third of ``lease_ms``
while the model is being written, and released once nothing has written it for ``idle_s``
seconds (so that after the ingress moves a model to another replica, that replica can take it
over within ``idle_s`` plus a renewal period). Every log append and snapshot runs as a Lua
script that first compares the lease with the writer's own ``replica:token`` and writes nothing
if they differ. A replica that lost its lease (paused, cut
off, or expired) therefore cannot write, even if it still believes it owns the model. A stale
version is refused by the Stream itself (entry ids only grow).

Durability. An append is acknowledged when Redis has answered the script; what that survives
depends on the server's persistence (see the README's table). When ``wait_aof`` is on and the
server supports ``WAITAOF`` (Redis >= 7.2), the store also waits until the write is fsync'd to the
local AOF before acknowledging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import NotOwner, StoreUnavailable
from service.store.base import LogRecord, Snapshot

__all__ = ["RedisStore"]

log = logging.getLogger("postserve.store.redis")

_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('POSTSERVE_NOT_OWNER')
end
redis.call('XADD', KEYS[2], ARGV[2] .. '-1', 'r', ARGV[3])
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
end
return 1
"""

_SNAPSHOT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('POSTSERVE_NOT_OWNER')
end
redis.call('HSET', KEYS[2], 'version', ARGV[2], 'tensors', ARGV[3], 'meta', ARGV[4])
redis.call('XTRIM', KEYS[3], 'MINID', tostring(tonumber(ARGV[2]) + 1) .. '-0')
return 1
"""

_TAKE = """
local cur = redis.call('GET', KEYS[1])
if cur == false or string.sub(cur, 1, string.len(ARGV[2]) + 1) == ARGV[2] .. ':' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 1
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


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


def _replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


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
        self._lease_ms, self._wait_aof, self._p = lease_ms, wait_aof, prefix
        self.replica = replica or _replica_id()
        self._timeout = timeout_s
        self._r: aioredis.Redis | None = None
        self._held: dict[str, tuple[str, float]] = {}  # name -> (holder value, local expiry)
        self._used: dict[str, float] = {}  # name -> when this replica last asked to write it
        self._idle_s = idle_s
        self._renewer: asyncio.Task[None] | None = None
        self._use_waitaof = False
        self._probed = False

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
        self._append = self._r.register_script(_APPEND)
        self._snapshot = self._r.register_script(_SNAPSHOT)
        self._renew = self._r.register_script(_RENEW)
        self._take = self._r.register_script(_TAKE)
        self._release = self._r.register_script(_RELEASE)
        self._put_event = self._r.register_script(_PUT_EVENT)
        self._renewer = asyncio.create_task(self._renew_loop())
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
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        for name in list(self._held):
            with contextlib.suppress(Exception):
                await self.release(name)
        if self._r is not None:
            await self._r.aclose()
            self._r = None

    async def ping(self) -> bool:
        try:
            return bool(await self._do(self.r.ping()))
        except StoreUnavailable:
            return False

    # -- leases ------------------------------------------------------------------------------

    async def acquire(self, name: str) -> bool:
        """Make sure this replica holds ``name``'s lease. True when it was newly taken (the
        caller's state may be behind the log), False when already held; NotOwner if another
        replica holds it."""
        self._used[name] = time.monotonic()
        held = self._held.get(name)
        if held is not None and held[1] - time.monotonic() > self._lease_ms / 3000:
            return False
        if held is not None:
            ok = await self._do(
                self._renew(keys=[self._k("lease", name)], args=[held[0], self._lease_ms])
            )
            if ok:
                self._held[name] = (held[0], time.monotonic() + self._lease_ms / 1000)
                return False
            self._held.pop(name, None)
        token = await self._do(self.r.incr(self._k("fence", name)))
        value = f"{self.replica}:{token}"
        got = await self._do(
            self._take(keys=[self._k("lease", name)], args=[value, self.replica, self._lease_ms])
        )
        if not got:
            owner = await self._do(self.r.get(self._k("lease", name)))
            who = owner.decode().rsplit(":", 1)[0] if owner else "another replica"
            raise NotOwner(
                f"model {name!r} is being written by replica {who}; send updates there, or retry "
                f"after its lease ({self._lease_ms} ms) lapses"
            )
        self._held[name] = (value, time.monotonic() + self._lease_ms / 1000)
        return True

    async def release(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is not None:
            await self._do(self._release(keys=[self._k("lease", name)], args=[held[0]]))

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            now = time.monotonic()
            for name, (value, _) in list(self._held.items()):
                if now - self._used.get(name, now) > self._idle_s:
                    with contextlib.suppress(StoreUnavailable):
                        await self.release(name)  # unused: let whoever the traffic goes to have it
                        log.info("released the idle lease of %s", name)
                    continue
                try:
                    ok = await self._do(
                        self._renew(keys=[self._k("lease", name)], args=[value, self._lease_ms])
                    )
                except StoreUnavailable:
                    continue  # the Lua fence still guards every write
                if ok:
                    self._held[name] = (value, time.monotonic() + self._lease_ms / 1000)
                else:
                    log.warning("lost the lease of %s", name)
                    self._held.pop(name, None)

    def _holder(self, name: str) -> str:
        held = self._held.get(name)
        if held is None:
            raise NotOwner(f"this replica does not hold the lease of model {name!r}")
        return held[0]

    async def _fenced(self, script: Any, keys: list[str], args: list[Any], name: str) -> None:
        try:
            await self._do(script(keys=keys, args=args))
        except ResponseError as exc:
            self._held.pop(name, None)
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
        self._held.pop(name, None)
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
    ) -> None:
        holder = self._holder(name)
        if not self._probed:
            await self._probe()
        with_request = request_id is not None and response is not None
        keys = [
            self._k("lease", name),
            self._k("log", name),
            self._k("req", name, request_id or ""),
        ]
        args: list[Any] = [
            holder,
            version,
            record,
            "1" if with_request else "",
            response or b"",
            self._ttl_ms,
        ]
        try:
            await self._do(self._append(keys=keys, args=args))
        except ResponseError as exc:
            if "POSTSERVE_NOT_OWNER" in str(exc):
                self._held.pop(name, None)
                raise NotOwner(f"this replica lost the lease of model {name!r}") from exc
            raise ValueError(f"log of {name!r} refused version {version}: {exc}") from exc
        if self._use_waitaof:
            wait = self.r.execute_command("WAITAOF", 1, 0, int(self._timeout * 1000))  # type: ignore[no-untyped-call]
            await self._do(wait)

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

    # -- snapshots ---------------------------------------------------------------------------

    async def put_snapshot(self, name: str, snapshot: Snapshot) -> None:
        holder = self._holder(name)
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
