"""The Redis write lease: one writer per model among replicas, with fencing tokens.

=====================================  =========================================================
key                                    contents
=====================================  =========================================================
``{p}lease:{name}``                    ``{replica}:{token}`` of the one replica that may write,
                                       expiring after ``lease_ms`` unless renewed
``{p}fence:{name}``                    counter; each new lease takes the next token
=====================================  =========================================================

One writer per model. A replica writes a model only while it holds the model's lease (taken
when the key is free, or when it names this same replica: a restarted pod with a stable
``POSTSERVE_REPLICA_ID`` takes its model back at once instead of waiting out its own lease; two
live processes must never share an id), renewed in the background every third of ``lease_ms``
while the model is being written, and released once nothing has written it for ``idle_s``
seconds (so that after the ingress moves a model to another replica, that replica can take it
over within ``idle_s`` plus a renewal period).

The lease value (:meth:`RedisLease.holder`) is what the store's writes are fenced with: every
log append and snapshot of :class:`~service.store.redis.RedisStore` runs as a Lua script that
first compares the lease key with the writer's own ``replica:token`` and writes nothing if they
differ. A replica that lost its lease (paused, cut off, or expired) therefore cannot write, even
if it still believes it owns the model; the store then calls :meth:`RedisLease.forget`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from service.errors import NotFound, NotOwner, StoreUnavailable

__all__ = ["RedisLease"]

log = logging.getLogger("postserve.store.redis")

# KEYS[1] - lease key
# KEYS[2] - the catalogue hash
# ARGV[1] - the new lease value, ``{replica}:{token}`` (token fresh from the fence counter)
# ARGV[2] - this replica's id
# ARGV[3] - lease duration in milliseconds
# ARGV[4] - the model's name
# return 1 if the lease was taken (it was free, or held by this same replica id), 0 if another
# replica holds it, -1 if the model is not in the catalogue (deleted, by another replica maybe)
_TAKE = """
if redis.call('HEXISTS', KEYS[2], ARGV[4]) == 0 then
  return -1
end
local cur = redis.call('GET', KEYS[1])
if cur == false or string.sub(cur, 1, string.len(ARGV[2]) + 1) == ARGV[2] .. ':' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 1
end
return 0
"""

# KEYS[1] - lease key
# ARGV[1] - the lease value this replica holds, ``{replica}:{token}``
# ARGV[2] - lease duration in milliseconds, counted from now
# return 1 if the lease was still ours and its expiry was reset, otherwise 0
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] - lease key
# ARGV[1] - the lease value this replica holds, ``{replica}:{token}``
# return 1 if the lease was ours and is now deleted, otherwise 0 (someone else's is left alone)
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class RedisLease:
    """The write leases of one replica, on a :class:`~service.store.redis.RedisStore`'s connection.

    ``client`` returns the open connection (raising StoreUnavailable when there is none), ``key``
    builds a prefixed key from its parts, and ``do`` awaits a command, turning connection errors
    into StoreUnavailable (and letting a refused command's ResponseError through).
    """

    shared = True  # replicas share the store

    def __init__(
        self,
        client: Callable[[], aioredis.Redis],
        key: Callable[..., str],
        do: Callable[[Awaitable[Any]], Awaitable[Any]],
        *,
        replica: str | None = None,
        lease_ms: int = 10_000,
        idle_s: float = 120.0,
    ) -> None:
        self._client, self._k, self._do = client, key, do
        self.replica = replica or _replica_id()
        self._lease_ms, self._idle_s = lease_ms, idle_s
        self._held: dict[str, tuple[str, float]] = {}  # name -> (holder value, local expiry)
        self._used: dict[str, float] = {}  # name -> when this replica last asked to write it
        self._renewer: asyncio.Task[None] | None = None
        self._take: AsyncScript | None = None
        self._renew: AsyncScript | None = None
        self._release: AsyncScript | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Register the scripts on the (open) connection and start the renewer."""
        r = self._client()
        self._take = r.register_script(_TAKE)
        self._renew = r.register_script(_RENEW)
        self._release = r.register_script(_RELEASE)
        self._renewer = asyncio.create_task(self._renew_loop())

    async def close(self) -> None:
        """Stop the renewer and release every lease this replica holds (best effort)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        for name in list(self._held):
            with contextlib.suppress(Exception):
                await self.release(name)

    # -- the Lease protocol ------------------------------------------------------------------

    async def acquire(self, name: str) -> bool:
        """Make sure this replica holds ``name``'s lease.

        True when it was newly taken (the caller's state may be behind the log and must catch up
        first), False when already held; raises NotOwner if another replica holds it, NotFound
        if the model is no longer in the catalogue (another replica deleted it).
        """
        self._used[name] = time.monotonic()
        held = self._held.get(name)
        if held is not None and held[1] - time.monotonic() > self._lease_ms / 3000:
            return False
        if held is not None:
            ok = await self._on_lease(self._renew, name, held[0], self._lease_ms)
            if ok:
                self._held[name] = (held[0], time.monotonic() + self._lease_ms / 1000)
                return False
            self._held.pop(name, None)
        token = await self._do(self._client().incr(self._k("fence", name)))
        value = f"{self.replica}:{token}"
        if self._take is None:
            raise StoreUnavailable("the redis store is not open")
        keys = [self._k("lease", name), self._k("models")]
        got = await self._do(
            self._take(keys=keys, args=[value, self.replica, self._lease_ms, name])
        )
        if got == -1:
            raise NotFound(f"no model named {name!r} (it was deleted)")
        if not got:
            owner = await self._do(self._client().get(self._k("lease", name)))
            who = owner.decode().rsplit(":", 1)[0] if owner else "another replica"
            raise NotOwner(
                f"model {name!r} is being written by replica {who}; send updates there, or retry "
                f"after its lease ({self._lease_ms} ms) lapses"
            )
        self._held[name] = (value, time.monotonic() + self._lease_ms / 1000)
        return True

    async def release(self, name: str) -> None:
        """Give ``name``'s lease back, if this replica holds it."""
        held = self._held.pop(name, None)
        if held is not None:
            await self._on_lease(self._release, name, held[0])

    # -- for the store -----------------------------------------------------------------------

    def holder(self, name: str) -> str:
        """The ``replica:token`` value this replica writes ``name`` with (what the store's
        scripts fence on); NotOwner if this replica does not hold the lease."""
        held = self._held.get(name)
        if held is None:
            raise NotOwner(f"this replica does not hold the lease of model {name!r}")
        return held[0]

    def forget(self, name: str) -> None:
        """Drop what this replica knows of ``name``'s lease (after a fence refused a write, or
        the model was deleted): the next ``acquire`` takes it afresh."""
        self._held.pop(name, None)
        self._used.pop(name, None)

    # -- plumbing ----------------------------------------------------------------------------

    async def _on_lease(self, script: AsyncScript | None, name: str, *args: str | int) -> Any:
        """Run one of the scripts above on ``name``'s lease key."""
        if script is None:
            raise StoreUnavailable("the redis store is not open")
        return await self._do(script(keys=[self._k("lease", name)], args=list(args)))

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
                    ok = await self._on_lease(self._renew, name, value, self._lease_ms)
                except StoreUnavailable:
                    continue  # the Lua fence still guards every write
                if ok:
                    self._held[name] = (value, time.monotonic() + self._lease_ms / 1000)
                else:
                    log.warning("lost the lease of %s", name)
                    self._held.pop(name, None)
