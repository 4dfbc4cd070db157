"""Coroutines started at once, as Python 3.12's eager tasks start them.

``asyncio.ensure_future(coro)`` runs nothing until the event loop's next turn, and awaiting the
task costs that turn and one more (about 7-11 us a request here). A store's ``append`` often
finishes without suspending (the memory store always does; the others queue the record first),
so :func:`started` runs the coroutine up to its first suspension now: when it finishes there,
its result is a future done already (no task, no turn of the loop); when it suspends, a task
goes on from that point, exactly as the coroutine would have gone on in a task of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar, cast

__all__ = ["started"]

T = TypeVar("T")


def started(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """``coro`` run now up to its first suspension: a done future if it finished (its result or
    its exception), else a task that resumes it (cancelling the task cancels the coroutine)."""
    loop = asyncio.get_running_loop()
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        done: asyncio.Future[T] = loop.create_future()
        done.set_result(stop.value)
        return done
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # what a task would hold, CancelledError too
        failed: asyncio.Future[T] = loop.create_future()
        if isinstance(exc, asyncio.CancelledError):
            failed.cancel()
        else:
            failed.set_exception(exc)
        return failed
    return asyncio.ensure_future(_resumed(coro, yielded))


async def _resumed(coro: Coroutine[Any, Any, T], yielded: Any) -> T:
    return await _Resume(coro, yielded)


class _Resume(Generic[T]):
    """Awaitable: hands the task what ``coro`` yielded (the future it waits on), then sends it
    what the task sends back, and throws into it what the task throws in, to the end."""

    def __init__(self, coro: Coroutine[Any, Any, T], yielded: Any) -> None:
        self.coro, self.yielded = coro, yielded

    def __await__(self) -> Generator[Any, Any, T]:
        coro, yielded = self.coro, self.yielded
        while True:
            try:
                sent = yield yielded
            except BaseException as exc:  # a cancellation: into the coroutine
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return cast(T, stop.value)
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return cast(T, stop.value)
