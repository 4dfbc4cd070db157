"""The Redis store's bandit events: kept by ``/decide``, read and settled by rewards.

=====================================  =========================================================
key                                    contents
=====================================  =========================================================
``{p}event:{name}:{event_id}``         hash ``e`` (expiry, unix s), ``r`` (record); the key lives
                                       a day past the expiry (for default rewards)
``{p}events:{name}``                   sorted set of pending event ids by expiry
=====================================  =========================================================

Events are not fenced by the lease: any replica may decide, and keeping an event only ever adds
a new id (a script, so that an existing id is never overwritten). The batch methods send one
round trip (a pipeline of those scripts, of reads, or one ``ZREM``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from service.errors import StoreUnavailable

__all__ = ["RedisEvents"]

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


class RedisEvents:
    """The event methods of the Store protocol, on a :class:`~service.store.redis.RedisStore`'s
    connection (``client``, ``key`` and ``do`` as for :class:`~service.store.redis_lease.RedisLease`).
    """

    def __init__(
        self,
        client: Callable[[], aioredis.Redis],
        key: Callable[..., str],
        do: Callable[[Awaitable[Any]], Awaitable[Any]],
    ) -> None:
        self._client, self._k, self._do = client, key, do
        self._put: AsyncScript | None = None

    def start(self) -> None:
        """Register the script on the (open) connection."""
        self._put = self._client().register_script(_PUT_EVENT)

    @property
    def _script(self) -> AsyncScript:
        if self._put is None:
            raise StoreUnavailable("the redis store is not open")
        return self._put

    def _put_args(
        self, name: str, event_id: str, record: bytes, expires_at: float, life_ms: int
    ) -> tuple[list[str], list[bytes | str | int]]:
        keys = [self._k("event", name, event_id), self._k("events", name)]
        return keys, [repr(expires_at), record, life_ms, event_id]

    async def put_event(self, name: str, event_id: str, record: bytes, expires_at: float) -> bool:
        keys, args = self._put_args(name, event_id, record, expires_at, _life_ms(expires_at))
        return bool(await self._do(self._script(keys=keys, args=args)))

    async def get_event(self, name: str, event_id: str) -> bytes | None:
        r = self._client()
        expires, record = await self._do(r.hmget(self._k("event", name, event_id), ["e", "r"]))
        if expires is None or float(expires) <= time.time():
            return None
        return bytes(record)

    async def settle_event(self, name: str, event_id: str) -> None:
        await self._do(self._client().zrem(self._k("events", name), event_id))

    async def put_events(
        self, name: str, events: Sequence[tuple[str, bytes]], expires_at: float
    ) -> list[bool]:
        """One pipelined round trip of ``put_event`` scripts (each atomic on its own)."""
        life_ms = _life_ms(expires_at)
        pipe = self._client().pipeline(transaction=False)
        for event_id, record in events:
            keys, args = self._put_args(name, event_id, record, expires_at, life_ms)
            await self._script(keys=keys, args=args, client=pipe)  # queued, not sent
        return [bool(done) for done in await self._do(pipe.execute())]

    async def get_events(self, name: str, event_ids: Sequence[str]) -> list[bytes | None]:
        pipe = self._client().pipeline(transaction=False)
        for event_id in event_ids:
            pipe.hmget(self._k("event", name, event_id), ["e", "r"])
        now = time.time()
        return [
            None if expires is None or float(expires) <= now else bytes(record)
            for expires, record in await self._do(pipe.execute())
        ]

    async def settle_events(self, name: str, event_ids: Sequence[str]) -> None:
        if event_ids:
            await self._do(self._client().zrem(self._k("events", name), *event_ids))

    async def expired_events(
        self, name: str, now: float, limit: int = 100
    ) -> list[tuple[str, bytes]]:
        r = self._client()
        ids = await self._do(
            r.zrangebyscore(self._k("events", name), "-inf", now, start=0, num=limit)
        )
        out: list[tuple[str, bytes]] = []
        for raw_id in ids:
            event_id = raw_id.decode()
            record = await self._do(r.hget(self._k("event", name, event_id), "r"))
            if record is None:  # outlived its grace period: nothing left to reward
                await self.settle_event(name, event_id)
            else:
                out.append((event_id, bytes(record)))
        return out


def _life_ms(expires_at: float) -> int:
    """The event hash's time to live: until its expiry and a grace period after it."""
    return max(1, int((expires_at - time.time() + _EVENT_GRACE_S) * 1000))
