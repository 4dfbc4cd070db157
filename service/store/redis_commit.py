"""The Redis store's log appends, group committed: one pipeline of fenced scripts per batch.

Each append is one Lua script (``_APPEND``): it compares the model's lease key with the writer's
``replica:token`` and writes nothing if they differ (:class:`~service.errors.NotOwner`), refuses
a record whose ``after`` is not the log's latest version (VersionConflict), then adds the Stream
entry ``{version}-1`` (the Stream itself refuses a version at or below its top, even past a
trim: VersionConflict) and every request record the record answers (one, or one per event of a
reward batch), all in one atomic step.

Group commit. :meth:`RedisCommitter.append` checks that this replica holds the lease, puts its
script call on a queue (before its first ``await``: ``service.store.group``) and waits. One
committer task drains the queue: every call queued so far goes out as one pipeline (one round
trip; no MULTI), followed by one ``WAITAOF`` for the whole batch when it is in use. Redis runs
the scripts in order, and with ``appendfsync always`` fsyncs the AOF once before it answers the
batch. Each script's own refusal (NotOwner, VersionConflict) fails only its append; a connection
error or timeout (or any other error of the batch) fails every append of the batch with
StoreUnavailable (then some of its scripts may have run: the caller's catch-up reads the log
back). Calls queued meanwhile make the next batch. Each caller's ``append`` returns, or raises,
only after the answer to its batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from service.errors import NotOwner, PostserveError, StoreUnavailable, VersionConflict
from service.store.group import GroupCommit
from service.store.redis_lease import RedisLease

__all__ = ["RedisCommitter"]

# KEYS[1] - lease key
# KEYS[2] - log stream
# KEYS[3] - snapshot hash (read only when ARGV[5] is set and the stream is empty)
# KEYS[4..] - the request record keys of the requests the record answers (none, one, or one per
#           event of a reward batch)
# ARGV[1] - the writer's lease value, ``{replica}:{token}``
# ARGV[2] - the model's version after the record (the entry id is ``{version}-1``)
# ARGV[3] - record bytes
# ARGV[4] - the request records' time to live in milliseconds
# ARGV[5] - the version the record follows ("" for any lower one): the log's latest version (its
#           top entry, else the snapshot's version, else 0) must be exactly this
# ARGV[6..] - the responses, ARGV[i + 2] for KEYS[i]
# return 1 once written; a POSTSERVE_NOT_OWNER error (nothing written) if the lease is not the
# writer's; POSTSERVE_NOT_AFTER {latest} (nothing written) if the log is not at ARGV[5]; XADD's
# own error (nothing written) for a version at or below the stream's top
_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('POSTSERVE_NOT_OWNER')
end
if ARGV[5] ~= '' then
  local latest = 0
  local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if #top > 0 then
    latest = tonumber(string.match(top[1][1], '^(%d+)'))
  else
    local snap = redis.call('HGET', KEYS[3], 'version')
    if snap then latest = tonumber(snap) end
  end
  if latest ~= tonumber(ARGV[5]) then
    return redis.error_reply('POSTSERVE_NOT_AFTER ' .. latest)
  end
end
redis.call('XADD', KEYS[2], ARGV[2] .. '-1', 'r', ARGV[3])
for i = 4, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 2], 'PX', ARGV[4])
end
return 1
"""


@dataclass
class _Append:
    """One queued append: its script's keys and arguments."""

    name: str
    version: int
    after: int | None
    keys: list[str]
    args: list[Any]


class RedisCommitter:
    """The appends of a :class:`~service.store.redis.RedisStore`: ``client``, ``key`` and ``do``
    as for :class:`~service.store.redis_lease.RedisLease`; ``lease`` gives the fencing values;
    ``waitaof`` answers whether to wait for the AOF fsync (probing the server first if needed);
    ``ttl_ms`` is the request records' time to live, ``timeout_s`` the most ``WAITAOF`` waits."""

    def __init__(
        self,
        client: Callable[[], aioredis.Redis],
        key: Callable[..., str],
        do: Callable[[Awaitable[Any]], Awaitable[Any]],
        lease: RedisLease,
        waitaof: Callable[[], Awaitable[bool]],
        *,
        ttl_ms: int,
        timeout_s: float,
    ) -> None:
        self._client, self._k, self._do = client, key, do
        self._lease, self._waitaof = lease, waitaof
        self._ttl_ms, self._timeout = ttl_ms, timeout_s
        self._sha = ""
        self._batches = GroupCommit(self._commit, "redis")

    @property
    def commits(self) -> int:
        """Batches sent (pipelines), for tests and benchmarks."""
        return self._batches.commits

    def start(self) -> None:
        """Register the script on the (open) connection."""
        self._sha = self._client().register_script(_APPEND).sha

    async def close(self) -> None:
        """Send what is queued and wait for its answers."""
        await self._batches.close()

    async def append(
        self,
        name: str,
        version: int,
        record: bytes,
        answers: Sequence[tuple[str, bytes]],
        after: int | None,
    ) -> None:
        """Queue one record (answering the ``(request_id, response)`` of ``answers``) and wait
        for the batch it goes out in; NotOwner at once if this replica does not hold the lease."""
        holder = self._lease.holder(name)
        keys = [self._k("lease", name), self._k("log", name), self._k("snap", name)]
        keys += [self._k("req", name, rid) for rid, _ in answers]
        args: list[Any] = [holder, version, record, self._ttl_ms, "" if after is None else after]
        args += [response for _, response in answers]
        await self._batches.submit(_Append(name, version, after, keys, args))

    async def _commit(self, batch: list[_Append]) -> list[PostserveError | None]:
        """One pipeline of the batch's scripts (and WAITAOF); per append None or its refusal."""
        waitaof = await self._waitaof()
        results = await self._pipeline(batch, waitaof)
        if any(isinstance(r, NoScriptError) for r in results):  # a restarted server: load, redo
            self._sha = await self._do(self._client().script_load(_APPEND))
            redo = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            again = await self._pipeline([batch[i] for i in redo], waitaof)
            for i, r in zip(redo, again, strict=True):
                results[i] = r
        return [self._outcome(a, r) for a, r in zip(batch, results, strict=True)]

    async def _pipeline(self, batch: list[_Append], waitaof: bool) -> list[Any]:
        """The batch's scripts in one round trip: each one's result, or its error. With WAITAOF
        (the last command: Redis answers it once the batch is fsync'd to its AOF), a script that
        wrote but whose fsync was not confirmed in time is StoreUnavailable."""
        pipe = self._client().pipeline(transaction=False)
        for a in batch:
            pipe.evalsha(self._sha, len(a.keys), *a.keys, *a.args)
        if waitaof:
            pipe.execute_command("WAITAOF", 1, 0, int(self._timeout * 1000))
        results = list(await self._do(pipe.execute(raise_on_error=False)))
        if not waitaof:
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
            self._lease.forget(a.name)
            return NotOwner(f"this replica lost the lease of model {a.name!r}")
        if "POSTSERVE_NOT_AFTER" in message:
            latest = message.rsplit(" ", 1)[-1]
            return VersionConflict(
                f"the log of {a.name!r} is at version {latest}, but the record of version "
                f"{a.version} follows version {a.after}; nothing was written"
            )
        if "equal or smaller than the target stream top item" in message:
            return VersionConflict(
                f"the log of {a.name!r} is already at version {a.version} or past it; "
                "nothing was written"
            )
        return StoreUnavailable(f"redis refused the append to {a.name!r}: {message}")
