"""Persistence behind one small byte-level protocol (see ``base``)."""

from service.store.base import LogRecord, Snapshot, Store
from service.store.memory import MemoryStore
from service.store.redis import RedisStore
from service.store.sqlite import SQLiteStore

__all__ = ["LogRecord", "MemoryStore", "RedisStore", "SQLiteStore", "Snapshot", "Store"]
