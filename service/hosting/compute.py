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

A process that may run on one core only (its affinity, ``cores()``) gains no parallelism from a
worker thread at all: the thread and the loop take turns on that core, and the GIL's hand-offs
between them cost CPU of their own (a bandit server pinned to one core, 1,000-item decide and
reward batches from two clients: 0.112 ms of CPU a decision with worker threads, 0.090 inline).
There, work up to ``SINGLE_CORE_INLINE_WORK`` runs inline, compiled or not: about 25 ms of a
1,000-row Kalman batch, about 120 ms of eager LoFi rows of a 10k-parameter model. Beyond it a thread
still takes the work, so that the loop answers health checks and small requests between its
rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple

import anyio
import anyio.to_thread

__all__ = ["COMPILED_INLINE_WORK", "INLINE_WORK", "SINGLE_CORE_INLINE_WORK", "Compute", "cores"]

#: Work below this (state bytes x rows) runs on the event loop.
INLINE_WORK = 1 << 18
#: The same for compiled work, which holds the GIL (see the module's docstring).
COMPILED_INLINE_WORK = 1 << 20
#: The same, compiled or not, for a process that may run on one core only.
SINGLE_CORE_INLINE_WORK = 1 << 26

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

    def __init__(self, threads: int = 0, single_core: bool | None = None) -> None:
        self._limiter = anyio.CapacityLimiter(threads or cores())
        self.single_core = cores() == 1 if single_core is None else single_core

    def inline(self, work: int, compiled: bool = False) -> bool:
        """Whether work of this size (state bytes x rows) runs on the event loop."""
        if self.single_core:
            return work <= SINGLE_CORE_INLINE_WORK
        return work <= (COMPILED_INLINE_WORK if compiled else INLINE_WORK)

    async def run(self, work: int, fn: Callable[[*Ts], T], *args: *Ts, compiled: bool = False) -> T:
        """``fn(*args)``; ``work`` is its size in state bytes x rows; ``compiled``: whether a
        compiled kernel does it (which holds the GIL)."""
        if self.inline(work, compiled):
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def offload(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """``fn(*args)`` on a worker thread, whatever its size (replay, model builds)."""
        return await anyio.to_thread.run_sync(fn, *args)
