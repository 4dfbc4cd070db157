"""``make_backend(settings)``: the configured store and the lease that says who may write it."""

from __future__ import annotations

from dataclasses import dataclass

from service.config import Settings
from service.store.base import Store
from service.store.lease import Lease, SoleWriter
from service.store.memory import MemoryStore
from service.store.redis import RedisStore
from service.store.sqlite import SQLiteStore

__all__ = ["Backend", "make_backend"]


@dataclass(frozen=True)
class Backend:
    """What the engine persists through: ``store`` keeps the bytes, ``lease`` says whether this
    process may write a model."""

    store: Store
    lease: Lease


def make_backend(settings: Settings) -> Backend:
    """memory and sqlite: one process, the sole writer; redis: the store's own lease."""
    if settings.store == "memory":
        return Backend(MemoryStore(settings.idempotency_ttl_s), SoleWriter())
    if settings.store == "redis":
        redis = RedisStore(
            settings.redis_url,
            settings.idempotency_ttl_s,
            lease_ms=settings.redis_lease_ms,
            wait_aof=settings.redis_wait_aof,
            timeout_s=settings.redis_timeout_s,
            idle_s=settings.redis_lease_idle_s,
            replica=settings.replica_id or None,
        )
        return Backend(redis, redis.lease)
    sqlite = SQLiteStore(settings.data_dir / "postserve.sqlite3", settings.idempotency_ttl_s)
    return Backend(sqlite, SoleWriter())
