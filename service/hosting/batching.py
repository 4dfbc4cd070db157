"""Cross-model batching (``POSTSERVE_BATCH_STEPS``): concurrent one-row updates of different
models of one filter and state shape are stepped together (``service.filters.batched``).

An update that may be batched (one row, all outputs observed, a :func:`batchable` filter) hands
its model's tip, row and target to :meth:`Coalescer.step` under its model's lock, and waits. The
first row of a group (one batched-step key) opens a window: the rows that arrive before it closes
(``batch_window_ms`` after it, or 0: within the same turn of the event loop) are stepped in one
call, on a worker thread when the batch is large, and each waiting update gets its own model's
result and goes on alone: its answer, log record (naming the batched step), append and
publication are its own, exactly as if it had been stepped alone. A full window
(``batch_max`` rows) is stepped at once. Updates of one model never share a batch: each holds its
model's lock while it waits.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from service.config import Settings
from service.filters import Belief
from service.filters.batched import BatchedStep, Result
from service.hosting.compute import Compute
from service.hosting.hosted import HostedModel
from service.hosting.kernels import Kernels

__all__ = ["Coalescer"]

log = logging.getLogger("postserve.hosting")

#: batches of more rows than this (state bytes x rows) are stepped on a worker thread
THREAD_WORK = 1 << 20


@dataclass
class _Window:
    step: BatchedStep[Belief]
    states: list[Belief] = field(default_factory=list)
    rows: list[Tensor] = field(default_factory=list)
    targets: list[Tensor] = field(default_factory=list)
    waiting: list[asyncio.Future[Result[Belief]]] = field(default_factory=list)


class Coalescer:
    """The open windows, one per batched-step key; counts what it batched."""

    def __init__(self, settings: Settings, compute: Compute, kernels: Kernels) -> None:
        self.window_s = settings.batch_window_ms / 1000
        self.max = settings.batch_max
        self.compute, self.kernels = compute, kernels
        self._open: dict[str, _Window] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # batched steps run
        self.rows = 0  # rows they stepped
        self.largest = 0

    async def step(self, h: HostedModel, state: Belief, x: Tensor, y: Tensor) -> Result[Belief]:
        """Model ``h``'s row ``x`` (1, I), target ``y`` (C,) from ``state``, stepped with the rows
        of other models that arrive in the same window: its new state and report, or None (a
        check failed, or the batched step did: the caller steps it eagerly)."""
        step = self.kernels.batched(h)
        window = self._open.get(step.key)
        if window is None:
            window = self._open[step.key] = _Window(step)
            loop = asyncio.get_running_loop()
            if self.window_s > 0:
                loop.call_later(self.window_s, self._close, step.key, window)
            else:
                loop.call_soon(self._close, step.key, window)
        waiting: asyncio.Future[Result[Belief]] = asyncio.get_running_loop().create_future()
        window.states.append(state)
        window.rows.append(x)
        window.targets.append(y)
        window.waiting.append(waiting)
        if len(window.waiting) >= self.max:
            self._close(step.key, window)
        return await waiting

    def _close(self, key: str, window: _Window) -> None:
        if self._open.get(key) is not window:
            return  # closed already (it filled up)
        del self._open[key]
        task = asyncio.create_task(self._run(window))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, w: _Window) -> None:
        n = len(w.waiting)
        self.batches += 1
        self.rows += n
        self.largest = max(self.largest, n)
        try:
            x, y = torch.stack(w.rows), torch.stack(w.targets)
            first = w.states[0]
            work = sum(getattr(first, k).nbytes for k in w.step.fields) * n
            if work > THREAD_WORK:
                results = await self.compute.offload(w.step, w.states, x, y)
            else:
                results = w.step(w.states, x, y)
        except Exception:  # the rows step eagerly, which raises their own errors
            log.exception("a batched step of %d rows failed; they step one at a time", n)
            results = [None] * n
        for waiting, result in zip(w.waiting, results, strict=True):
            if not waiting.done():  # its request may have been cancelled meanwhile
                waiting.set_result(result)

    async def stop(self) -> None:
        for task in list(self._tasks):
            await task
