"""Compiled steps for the hosted models (``POSTSERVE_COMPILE_STEPS``), built off the request path.

With the setting on, each model's step is compiled (:mod:`service.filters.compiled`) on one
background thread after the model is created or restored, while it keeps stepping eagerly; once
built, updates use it. Each log record names the kernel that computed it (``LogEntry.kernel``)
and a replay steps each record through that same kernel, loaded from the kernel directory (or
compiled again), so the state comes back bit for bit. A record computed by a kernel this process
cannot have (another torch version or CPU, or the setting turned off) is replayed by the eager
step or this process's kernel, with a warning: the same observations, rounding aside.

A model whose step cannot be compiled keeps the eager step (``kernel_error`` says why).

Rows that observe one output alone (``/update``'s ``outputs``, a reward of a model whose
outputs are its arms) are steps of the restricted filters, one per output: their C kernels
(``compile_output_steps``) are built in the background when the first such row arrives, named
in records by the set's key, and replayed the same way.

A Thompson decision among the outputs of one row (``/decide`` with a context alone, on a model
drawn in output space) is made by a compiled kernel too (``compile_draws``), built in the
background at the first such decision; decisions are not replayed, so no record names it. So is
the linearised predictive of one row (``/predict`` of one row: ``compile_predictive``), built at
the first such prediction.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from service.config import Settings
from service.filters import Belief, OnlineFilter
from service.filters.batched import BATCHED, BatchedStep, batched_key, batched_step, row_kernel
from service.filters.compiled import (
    OUTPUT_KERNELS,
    DrawKernel,
    OutputKernels,
    PredictKernel,
    RowKernel,
    compile_draws,
    compile_output_steps,
    compile_predictive,
    compile_step,
    kernel_key,
    output_kernels_key,
)
from service.filters.draws import in_output_space
from service.filters.statespace import StateSpace
from service.hosting.hosted import HostedModel

__all__ = ["Kernels"]

T = TypeVar("T")


class _Named(Protocol):
    """A built kernel (or set), named in logs by its key."""

    @property
    def key(self) -> str: ...


K = TypeVar("K", bound=_Named)

log = logging.getLogger("postserve.hosting")


class Kernels:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.compile_steps
        self.directory = settings.kernel_directory
        self.samples = settings.propensity_samples
        self._limiter = anyio.CapacityLimiter(1)  # one compile at a time: each takes the cores
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned: set[tuple[str, str]] = set()  # (model, kernel) replayed without it
        self._batched: dict[str, BatchedStep[Belief]] = {}  # batched steps, by key

    def start(self, h: HostedModel) -> None:
        """Build ``h``'s compiled step in the background, when the setting is on."""
        if not self.enabled or h.kernel is not None:
            return
        self._spawn(self._build(h))

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

    def start_outputs(self, h: HostedModel) -> None:
        """Build ``h``'s output kernels in the background (once), when the setting is on."""
        if not self.enabled or h.output_kernels_started:
            return
        h.output_kernels_started = True
        self._spawn(self._build_outputs(h))

    def start_draws(self, h: HostedModel) -> None:
        """Build ``h``'s compiled Thompson draws of one row in the background (once), when the
        setting is on and the model draws in output space (``DrawKernel``)."""
        drawn = in_output_space(h.filter, 1, h.spec.thompson == "linearized")
        if not self.enabled or h.draw_kernel_started or not drawn:
            return
        h.draw_kernel_started = True
        self._spawn(self._build_draws(h))

    async def _build_draws(self, h: HostedModel) -> None:
        def install(kernel: DrawKernel[Belief]) -> None:
            h.draw_kernel = kernel

        build = functools.partial(compile_draws, samples=self.samples)
        await self._build_into(h, build, install, "Thompson draws of one row", "decides eagerly")

    def start_predictive(self, h: HostedModel) -> None:
        """Build ``h``'s compiled predictive of one row in the background (once), when the
        setting is on (``PredictKernel``; not for a state-space model)."""
        if not self.enabled or h.predict_kernel_started or isinstance(h.filter.network, StateSpace):
            return
        h.predict_kernel_started = True

        def install(kernel: PredictKernel[Belief]) -> None:
            h.predict_kernel = kernel

        self._spawn(
            self._build_into(h, compile_predictive, install, "predictive of one row", "eagerly")
        )

    def _spawn(self, build: Coroutine[Any, Any, None]) -> None:
        """Run ``build`` as a task that ``stop`` cancels."""
        task = asyncio.create_task(build)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _build_outputs(self, h: HostedModel) -> None:
        def install(kernels: OutputKernels[Belief]) -> None:
            h.output_kernels = kernels

        await self._build_into(
            h, compile_output_steps, install, "steps of single outputs", "they step eagerly"
        )

    async def _build_into(
        self,
        h: HostedModel,
        build: Callable[[OnlineFilter[Belief], Belief, Path], K],
        install: Callable[[K], None],
        what: str,
        otherwise: str,
    ) -> None:
        """``build`` on the compile thread, then ``install`` what it built unless the model was
        deleted meanwhile; a failure is logged (the model goes on without it: ``otherwise``)."""
        try:
            built = await self._on_thread(build, h)
        except Exception as exc:  # the compiler's own failures are many
            log.warning("%s: no compiled %s, %s: %s", h.name, what, otherwise, exc)
            return
        if not h.deleted:
            install(built)
            log.info("%s: compiled %s loaded (%s)", h.name, what, built.key)

    async def _compile_outputs(self, h: HostedModel) -> OutputKernels[Belief]:
        return await self._on_thread(compile_output_steps, h)

    async def _compile(self, h: HostedModel) -> RowKernel[Belief]:
        return await self._on_thread(compile_step, h)

    async def _on_thread(
        self, build: Callable[[OnlineFilter[Belief], Belief, Path], T], h: HostedModel
    ) -> T:
        """``build(h's filter, its current state, the kernel directory)`` on the compile thread,
        one compile at a time."""
        return await anyio.to_thread.run_sync(
            build,
            h.filter,
            h.current.state,
            self.directory,
            limiter=self._limiter,
            abandon_on_cancel=True,  # a stop need not wait out a compile
        )

    async def for_replay(
        self, h: HostedModel, key: str | None
    ) -> RowKernel[Belief] | OutputKernels[Belief] | None:
        """The kernel that computed a log record (``key``; None: the eager step), built now if
        this process can build it."""
        if key is None:
            return None
        if key.startswith(BATCHED):  # stepped with other models: the same step, a batch of one
            return self._batched_for_replay(h, key)
        if key.startswith(OUTPUT_KERNELS):
            return await self._outputs_for_replay(h, key)
        if h.kernel is None and self.enabled and kernel_key(h.filter, h.current.state) == key:
            try:
                h.kernel = await self._compile(h)
            except Exception as exc:
                h.kernel_error = f"{type(exc).__name__}: {exc}"[:500]
        if h.kernel is not None and h.kernel.key == key:
            return h.kernel
        if (h.name, key) in self._warned:  # once per model and kernel, not once per record
            return h.kernel
        self._warn(h, key, h.kernel)
        return h.kernel

    def batched(self, h: HostedModel) -> BatchedStep[Belief]:
        """``h``'s batched step (``service.filters.batched``: built at once, no compile), one
        per key, shared by the models of that key (the coalescer's and replays')."""
        key = h.batch_key
        if key is None:
            key = h.batch_key = batched_key(h.filter, h.current.state)
        step = self._batched.get(key)
        if step is None:
            step = self._batched[key] = batched_step(h.filter, h.current.state)
        return step

    def _batched_for_replay(self, h: HostedModel, key: str) -> RowKernel[Belief] | None:
        step = self.batched(h)
        if step.key != key:  # another torch, CPU or filter code: the eager step
            if (h.name, key) not in self._warned:
                self._warn(h, key, None)
            return None
        return row_kernel(step)

    async def _outputs_for_replay(self, h: HostedModel, key: str) -> OutputKernels[Belief] | None:
        state = h.current.state
        if h.output_kernels is None and self.enabled and output_kernels_key(h.filter, state) == key:
            h.output_kernels_started = True
            try:
                h.output_kernels = await self._compile_outputs(h)
            except Exception as exc:
                log.warning("%s: no compiled steps of single outputs: %s", h.name, exc)
        if h.output_kernels is not None and h.output_kernels.key == key:
            return h.output_kernels
        if (h.name, key) not in self._warned:
            self._warn(h, key, h.output_kernels)
        return h.output_kernels

    def _warn(
        self, h: HostedModel, key: str, instead: RowKernel[Belief] | OutputKernels[Belief] | None
    ) -> None:
        self._warned.add((h.name, key))
        log.warning(
            "%s: a log record was computed by kernel %s, which this process does not have; "
            "replayed with %s (rounding may differ)",
            h.name,
            key,
            "kernel " + instead.key if instead is not None else "the eager step",
        )

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
