"""Where a filter computation runs: inline on the event loop when small, else on a worker thread.

A thread hop costs about 85 us here, more than a small model's whole step, so work below
``INLINE_WORK`` (state bytes x rows) runs inline; anything larger goes to a worker thread, at
most ``threads`` at a time (more than one per core only adds contention).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple

import anyio
import anyio.to_thread

__all__ = ["INLINE_WORK", "Compute", "cores"]

#: Work below this (state bytes x rows) runs on the event loop.
INLINE_WORK = 1 << 18

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Compute:
    """Runs filter work of a given size inline or on one of ``threads`` worker threads."""

    def __init__(self, threads: int = 0) -> None:
        self._limiter = anyio.CapacityLimiter(threads or cores())

    async def run(self, work: int, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """``fn(*args)``; ``work`` is its size in state bytes x rows."""
        if work <= INLINE_WORK:
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def offload(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """``fn(*args)`` on a worker thread, whatever its size (replay, model builds)."""
        return await anyio.to_thread.run_sync(fn, *args)
