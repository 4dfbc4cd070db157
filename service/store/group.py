"""Group commit: the queue and committer task the durable stores share (``base``'s protocol).

:meth:`GroupCommit.submit` queues one item (an append) before its first ``await`` and waits. One
committer task drains the queue: it hands every item queued so far to the store's ``commit`` as
one batch, and the items that arrive meanwhile make the next batch (one item alone when the store
is idle: no added wait). ``commit`` answers each item's outcome, in order: None (written) or the
error that refused it alone. If ``commit`` raises, every item of the batch fails with
StoreUnavailable. Each ``submit`` returns, or raises, only after the batch that held its item;
an item whose caller stopped waiting keeps its outcome regardless.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from service.errors import PostserveError, StoreUnavailable

__all__ = ["GroupCommit"]

A = TypeVar("A")


class GroupCommit(Generic[A]):
    """Batches of items for ``commit`` (``store`` names the backend in error messages)."""

    def __init__(
        self, commit: Callable[[list[A]], Awaitable[Sequence[PostserveError | None]]], store: str
    ) -> None:
        self._commit, self._store = commit, store
        self._queue: list[tuple[A, asyncio.Future[None]]] = []
        self._committer: asyncio.Task[None] | None = None
        self.commits = 0  # batches committed (or attempted), for tests and benchmarks

    async def submit(self, item: A) -> None:
        """Queue ``item`` (at once, before any suspension) and wait for its batch's outcome."""
        done = asyncio.get_running_loop().create_future()
        self._queue.append((item, done))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_queued())
        await done

    async def close(self) -> None:
        """Commit what is queued and wait for it."""
        if self._committer is not None:
            await asyncio.shield(self._committer)

    async def _commit_queued(self) -> None:
        """Commit batches until the queue is empty; each batch is what was queued while the
        previous one was being committed."""
        batch: list[tuple[A, asyncio.Future[None]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                self.commits += 1
                outcomes: Sequence[PostserveError | None]
                try:
                    outcomes = await self._commit([item for item, _ in batch])
                except Exception as exc:  # unreachable, refused, or anything else: all fail
                    message = exc.message if isinstance(exc, PostserveError) else str(exc)
                    outcomes = [
                        StoreUnavailable(f"{self._store} commit failed: {message}") for _ in batch
                    ]
                for (_, done), outcome in zip(batch, outcomes, strict=True):
                    if done.done():  # its caller gave up; the outcome stands regardless
                        continue
                    if outcome is None:
                        done.set_result(None)
                    else:
                        done.set_exception(outcome)
        finally:  # the queue is empty, unless this task was cancelled: nobody may wait forever
            self._committer = None
            for _, done in [*batch, *self._queue]:
                if not done.done():
                    done.set_exception(
                        StoreUnavailable(f"the {self._store} store stopped committing")
                    )
            self._queue = []
