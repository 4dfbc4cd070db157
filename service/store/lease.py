"""The write lease: who may write a model. One writer per model, always.

The store keeps bytes; the lease says whether this process may append to a model's log or
snapshot it. The engine asks before every write (``acquire``) and, when the right was newly
taken, first catches up with the log, since another writer may have appended to it meanwhile.

Single-process stores (memory, sqlite) use :class:`SoleWriter`: this process is the only writer.
The Redis store, shared by replicas, has its own lease with fencing tokens
(:class:`~service.store.redis_lease.RedisLease`).
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Lease", "SoleWriter"]


class Lease(Protocol):
    #: whether other replicas share the store (and create and write models in it)
    shared: bool

    async def acquire(self, name: str) -> bool:
        """Make sure this process may write ``name``.

        True when the right to write ``name`` was newly taken, so the caller must catch up with
        the log first (its state may lag what another writer appended); False when it was
        already held. Raises :class:`~service.errors.NotOwner` when another replica holds it.
        """
        ...

    async def release(self, name: str) -> None:
        """Give the right to write ``name`` back (nothing happens if it was not held)."""
        ...


class SoleWriter:
    """The lease of a single-process store: this process is the only writer.

    ``acquire`` always answers False (the right is always held, there is nothing to catch up
    with) and never raises; ``release`` does nothing.
    """

    shared = False

    async def acquire(self, name: str) -> bool:
        return False

    async def release(self, name: str) -> None:
        return None
