"""The store protocol: a small byte-level interface the engine persists through.

A store never interprets tensors or specs: it keeps bytes. Five kinds of record, per model name:

============  ======================================================================
catalogue     name -> spec (JSON bytes)
log           (name, version) -> record bytes; ``version`` is the model's version after the
              record is applied; appended in increasing version order
requests      (name, request_id) -> the response first given (bytes), kept ``ttl`` seconds;
              written in the same atomic step as the log record it answered (one record may
              answer several requests: a batch of rewards, one request id per event)
snapshots     name -> (version, tensors (safetensors bytes), meta (JSON bytes)), latest only
events        (name, event_id) -> record bytes until ``expires_at`` (unix seconds), and
              whether it is still *pending* (unrewarded): ``/decide`` writes them,
              ``/reward`` settles them, expired pending ones may get a default reward
============  ======================================================================

Durability: when ``append`` returns, the record is durable to the backend's stated guarantee
(sqlite: fsync'd WAL commit). A record at or below the log's latest version raises
:class:`~service.errors.VersionConflict`, and so does one whose ``after`` (the version it follows,
when given) is not the log's latest; any other failure raises
:class:`~service.errors.StoreUnavailable`. Either way nothing of that record is written, nor
any of the request records it carries (one append is one atomic step: the log record and every
request record it answers, or none of them).

Group commit. ``append`` is awaited per record, but a durable store commits the appends that
arrive while its previous commit is in flight together (sqlite: one transaction and one fsync;
redis: one pipeline, one round trip; the queue is ``service.store.group``'s). A batch behaves
as its appends one after another, each checked on its own: a refused record (VersionConflict,
NotOwner) fails alone, with its request records, and the others commit; a failure of the commit
itself fails every append in it and writes none of them. The other methods (the batched reads
and event writes included) do not go through that queue.

Order. An append is queued before its first ``await``, so appends *called* in some order (a
caller may start the next as a task before the previous returns) are checked and committed in
that order. With ``after`` a caller can chain records: a record whose predecessor failed is
refused, whichever commit it lands in, so the log never gets a gap.

Who may write a model is not the store's business but its lease's (``service.store.lease``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from service.errors import VersionConflict

__all__ = ["LogRecord", "Snapshot", "Store", "refusal"]


@dataclass(frozen=True)
class LogRecord:
    version: int
    record: bytes


@dataclass(frozen=True)
class Snapshot:
    version: int
    tensors: bytes
    meta: bytes


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """True when the store can take writes."""
        ...

    async def create_model(self, name: str, spec: bytes) -> bool:
        """Add to the catalogue; False (and no change) if the name exists."""
        ...

    async def delete_model(self, name: str) -> bool:
        """Remove the model, its log, snapshots and request records; False if absent."""
        ...

    async def list_models(self) -> dict[str, bytes]: ...

    async def get_model(self, name: str) -> bytes | None:
        """The spec ``name`` was created with; None if there is no such model."""
        ...

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
        """Durably append one log record (and its request records), atomically: the record with
        ``request_id``'s response and every further ``(request_id, response)`` of ``requests``.

        VersionConflict (and nothing written) when ``version`` is at or below the log's latest
        version, counting records already trimmed by a snapshot, or when ``after`` is given and
        the log's latest version (0 for an empty log) is not ``after``. Returns once the commit
        that holds the record is durable; appends in flight together share that commit.
        """
        ...

    async def read_log(self, name: str, after: int = 0) -> list[LogRecord]:
        """Records with version > ``after``, in version order."""
        ...

    async def get_response(self, name: str, request_id: str) -> bytes | None:
        """The response stored with ``request_id`` if it is younger than the TTL."""
        ...

    async def get_responses(self, name: str, request_ids: Sequence[str]) -> list[bytes | None]:
        """``get_response`` of each id, in order (one round trip where the backend allows)."""
        ...

    async def put_snapshot(self, name: str, snapshot: Snapshot) -> None:
        """Store the snapshot, then trim log records with version <= snapshot.version."""
        ...

    async def get_snapshot(self, name: str) -> Snapshot | None: ...

    async def put_event(self, name: str, event_id: str, record: bytes, expires_at: float) -> bool:
        """Keep a pending event until ``expires_at``; False (and no change) if the id exists."""
        ...

    async def get_event(self, name: str, event_id: str) -> bytes | None:
        """The event's record, or None if unknown or expired."""
        ...

    async def settle_event(self, name: str, event_id: str) -> None:
        """The event got its reward: no longer pending (its record stays until it expires)."""
        ...

    async def put_events(
        self, name: str, events: Sequence[tuple[str, bytes]], expires_at: float
    ) -> list[bool]:
        """``put_event`` of each ``(event_id, record)``, all until ``expires_at``, in one write
        (one transaction where the backend has them); each answer as ``put_event``'s."""
        ...

    async def get_events(self, name: str, event_ids: Sequence[str]) -> list[bytes | None]:
        """``get_event`` of each id, in order."""
        ...

    async def settle_events(self, name: str, event_ids: Sequence[str]) -> None:
        """``settle_event`` of each id, in one write."""
        ...

    async def expired_events(
        self, name: str, now: float, limit: int = 100
    ) -> list[tuple[str, bytes]]:
        """Up to ``limit`` pending events whose expiry is <= ``now``, oldest first; forgets
        settled ones that expired."""
        ...


def refusal(
    name: str, version: int, after: int | None, latest: int | None
) -> VersionConflict | None:
    """Why a record of ``version`` (following ``after``, if given) may not go on a log whose
    latest version is ``latest`` (None: no record, no snapshot), or None if it may."""
    if after is not None and (latest or 0) != after:
        return VersionConflict(
            f"the log of {name!r} is at version {latest or 0}, but the record of version "
            f"{version} follows version {after}; nothing was written"
        )
    if latest is not None and latest >= version:
        return VersionConflict(
            f"the log of {name!r} is at version {latest}, got {version}; nothing was written"
        )
    return None
