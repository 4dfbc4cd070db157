"""Compiled steps for the hosted models (``POSTSERVE_COMPILE_STEPS``), built off the request path.

With the setting on, each model's step is compiled (:mod:`service.filters.compiled`) on one
background thread after the model is created or restored, while it keeps stepping eagerly; once
built, updates use it. Each log record names the kernel that computed it (``LogEntry.kernel``)
and a replay steps each record through that same kernel, loaded from the kernel directory (or
compiled again), so the state comes back bit for bit. A record computed by a kernel this process
cannot have (another torch version or CPU, or the setting turned off) is replayed by the eager
step or this process's kernel, with a warning: the same observations, rounding aside.

A model whose step cannot be compiled keeps the eager step (``kernel_error`` says why).
"""

from __future__ import annotations

import asyncio
import logging

import anyio
import anyio.to_thread

from service.config import Settings
from service.filters import Belief
from service.filters.compiled import RowKernel, compile_step, kernel_key
from service.hosting.hosted import HostedModel

__all__ = ["Kernels"]

log = logging.getLogger("postserve.hosting")


class Kernels:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.compile_steps
        self.directory = settings.kernel_directory
        self._limiter = anyio.CapacityLimiter(1)  # one compile at a time: each takes the cores
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned: set[tuple[str, str]] = set()  # (model, kernel) replayed without it

    def start(self, h: HostedModel) -> None:
        """Build ``h``'s compiled step in the background, when the setting is on."""
        if not self.enabled or h.kernel is not None:
            return
        task = asyncio.create_task(self._build(h))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _build(self, h: HostedModel) -> None:
        try:
            kernel = await self._compile(h)
        except Exception as exc:  # the compiler's own failures are many; the model steps on
            h.kernel_error = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("%s: no compiled step, it steps eagerly: %s", h.name, h.kernel_error)
            return
        if not h.deleted:
            h.kernel = kernel
            log.info("%s: steps with compiled kernel %s", h.name, kernel.key)

    async def _compile(self, h: HostedModel) -> RowKernel[Belief]:
        state = h.current.state
        return await anyio.to_thread.run_sync(
            compile_step,
            h.filter,
            state,
            self.directory,
            limiter=self._limiter,
            abandon_on_cancel=True,  # a stop need not wait out a compile
        )

    async def for_replay(self, h: HostedModel, key: str | None) -> RowKernel[Belief] | None:
        """The kernel that computed a log record (``key``; None: the eager step), built now if
        this process can build it."""
        if key is None:
            return None
        if h.kernel is None and self.enabled and kernel_key(h.filter, h.current.state) == key:
            try:
                h.kernel = await self._compile(h)
            except Exception as exc:
                h.kernel_error = f"{type(exc).__name__}: {exc}"[:500]
        if h.kernel is not None and h.kernel.key == key:
            return h.kernel
        if (h.name, key) in self._warned:  # once per model and kernel, not once per record
            return h.kernel
        self._warned.add((h.name, key))
        log.warning(
            "%s: a log record was computed by kernel %s, which this process does not have; "
            "replayed with %s (rounding may differ)",
            h.name,
            key,
            "kernel " + h.kernel.key if h.kernel is not None else "the eager step",
        )
        return h.kernel

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
