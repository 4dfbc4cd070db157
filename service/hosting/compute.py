"""Where a filter computation runs: inline on the event loop when small, else on a worker thread.

A thread hop costs about 85 us here, more than a small model's whole step, so work below
``INLINE_WORK`` (state bytes x rows) runs inline; anything larger goes to a worker thread, at
most ``threads`` at a time (more than one per core only adds contention).

A compiled step (``service.filters.compiled``) holds the GIL for the whole kernel, as
AOTInductor's runner does: on a worker thread it runs no more in parallel with the event loop
than inline, and costs the hop (85-230 us for the 0.5 MB state of a 10k-parameter LoFi model,
against its 0.35 ms step: ``benchmarks/README.md`` row 2c). So compiled work runs inline up to
``COMPILED_INLINE_WORK``, about a millisecond of a compiled LoFi step; past it a worker thread
still takes it, so that the loop runs between its rows (the GIL changes hands every 5 ms).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple

import anyio
import anyio.to_thread

__all__ = ["COMPILED_INLINE_WORK", "INLINE_WORK", "Compute", "cores"]

#: Work below this (state bytes x rows) runs on the event loop.
INLINE_WORK = 1 << 18
#: The same for compiled work, which holds the GIL (see the module's docstring).
COMPILED_INLINE_WORK = 1 << 20

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

    async def run(self, work: int, fn: Callable[[*Ts], T], *args: *Ts, compiled: bool = False) -> T:
        """``fn(*args)``; ``work`` is its size in state bytes x rows; ``compiled``: whether a
        compiled kernel does it (which holds the GIL)."""
        if work <= (COMPILED_INLINE_WORK if compiled else INLINE_WORK):
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def offload(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """``fn(*args)`` on a worker thread, whatever its size (replay, model builds)."""
        return await anyio.to_thread.run_sync(fn, *args)
