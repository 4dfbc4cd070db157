"""Persistence behind one small byte-level protocol (see ``base``), and the write lease that says
who may write a model (see ``lease``); ``make_backend`` builds both from the settings."""

from service.errors import VersionConflict
from service.store.base import LogRecord, Snapshot, Store
from service.store.factory import Backend, make_backend
from service.store.lease import Lease, SoleWriter
from service.store.memory import MemoryStore
from service.store.redis import RedisStore
from service.store.redis_lease import RedisLease
from service.store.sqlite import SQLiteStore

__all__ = [
    "Backend",
    "Lease",
    "LogRecord",
    "MemoryStore",
    "RedisLease",
    "RedisStore",
    "SQLiteStore",
    "Snapshot",
    "SoleWriter",
    "Store",
    "VersionConflict",
    "make_backend",
]
