"""One row's step of each of N models of one filter and state shape, in one pass (cross-model
batching, ``docs/algorithms.md`` 6.6).

The compiled step's traced function (``compiled._Step``: ``OnlineFilter._update`` after
``predict``, the same Python math) is mapped over a leading model axis by ``torch.func.vmap``, in
its branch-free ``tracing`` form::

    step(state fields (N, ...)..., x (N, 1, I), y (N, C))
        -> (new state fields (N, ...)..., predictive mean, epistemic, aleatoric (N, 1, C),
            log density (N,), eta (N, 1, C), var_eta (N, 1, C, C), packed report (N, k),
            verdict (N,))

so a batch of small models costs about as many dispatches as one of them: the per-op overhead
that dominates a 17-parameter step (``benchmarks/README.md`` row 1a) is paid once per batch. A
model whose verdict is false (a check failed: non-finite x, a factorisation that would need
jitter) gets ``None`` and is stepped eagerly by the caller, which retries or raises the exact
error.

Bits: each model's slice of the batched step does not depend on how many models share the batch
or on where it sits in it (``tests/test_batching.py``: N = 1 against N = 1,000, every slice), so a
model's answers are the same whether it was stepped alone or with others; they differ from the
eager and the AOTInductor steps' by rounding, which is why a log record names this step
(:func:`batched_key`) and a replay steps it through the same function (:func:`row_kernel`).

Which filters: those whose mapped step keeps that property and gains from it (:func:`batchable`):
the exact Kalman filter of a linear network with a gaussian likelihood (the "regression per
tenant" model). The EKF and the diagonal EKF of an MLP map too, but their Jacobians fall back to
a loop over the batch (no faster than one at a time) or, in float32, round differently with the
batch's size; LoFi writes into buffers in place, which ``vmap`` refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic

import torch
from torch import Tensor

from service.filters.algorithm import S
from service.filters.base import RowReport
from service.filters.compiled import RowKernel, _fields, _Step, kernel_key
from service.filters.ekf import Kalman
from service.filters.likelihoods import Gaussian
from service.filters.linalg import tracing
from service.filters.online import OnlineFilter
from service.filters.statespace import StateSpace

__all__ = [
    "BATCHED",
    "BatchedStep",
    "Stepped",
    "batchable",
    "batched_key",
    "batched_step",
    "row_kernel",
]

#: the prefix of a batched step's key (a log record's ``kernel``)
BATCHED = "batched-"
#: models in one pass of the mapped step (a batch is stepped in chunks of this many)
CHUNK = 256


@dataclass(frozen=True)
class Stepped(Generic[S]):
    """One model's result in a batch: its new state and its row's report, on the host."""

    state: S
    report: RowReport


Result = Stepped[S] | None


def batchable(f: OnlineFilter[S]) -> bool:
    """Whether ``f``'s one-row steps of many models may be batched (see the module's docstring)."""
    return (
        isinstance(f.algorithm, Kalman)
        and isinstance(f.likelihood, Gaussian)
        and f.network.linear_in_params
        and not isinstance(f.network, StateSpace)  # its transition is built on the host
    )


def batched_key(f: OnlineFilter[S], state: S) -> str:
    """The key of ``f``'s batched step at ``state``'s shapes (models of one key batch together)."""
    return BATCHED + kernel_key(f, state)


@dataclass(frozen=True)
class BatchedStep(Generic[S]):
    """The mapped step of one filter at one state shape (see the module's docstring)."""

    key: str
    state_type: type[S]
    fields: tuple[str, ...]
    run: Callable[..., tuple[Tensor, ...]]

    def __call__(self, states: Sequence[S], x: Tensor, y: Tensor) -> list[Result[S]]:
        """Row ``x[i]`` (1, I) with encoded target ``y[i]`` (C,) of model i from ``states[i]``
        (before the dynamics), for each i: its new state and its row's report, or ``None`` when
        one of its checks failed (the caller steps it eagerly). The reports come to the host in
        one copy; a model's own tensors are only its state's (views of the batch's). Stepped
        ``CHUNK`` models at a time: past a few hundred small states a pass falls out of the
        CPU's caches (1,000 Kalman Linear(16) models: 90k updates/s in one pass, 113k in
        chunks of 256); a model's bits do not depend on its chunk (see the module's docstring)."""
        results: list[Result[S]] = []
        for i in range(0, len(states), CHUNK):
            results += self._chunk(states[i : i + CHUNK], x[i : i + CHUNK], y[i : i + CHUNK])
        return results

    def _chunk(self, states: Sequence[S], x: Tensor, y: Tensor) -> list[Result[S]]:
        args = [torch.stack([getattr(s, k) for s in states]) for k in self.fields]
        with tracing():
            out = self.run(*args, x, y)
        n = len(self.fields)
        verdicts = out[-1].tolist()  # one host sync for the batch
        packed = out[n + 6]  # (N, 4 C + 1): mean, variance, epistemic, aleatoric, log density
        C = (packed.shape[1] - 1) // 4
        reports = packed.tolist()
        fields = [t.unbind(0) for t in out[:n]]
        results: list[Result[S]] = []
        for i, ok in enumerate(verdicts):
            if not ok:
                results.append(None)
                continue
            r = reports[i]
            report = RowReport(r[:C], r[C : 2 * C], r[2 * C : 3 * C], r[3 * C : 4 * C], r[4 * C])
            results.append(Stepped(self.state_type(*(f[i] for f in fields)), report))
        return results


def batched_step(f: OnlineFilter[S], state: S) -> BatchedStep[S]:
    """``f``'s batched step at ``state``'s shapes (no compile: building it is immediate)."""
    fields = _fields(state)
    mapped = torch.func.vmap(_Step(f, type(state), fields).forward)
    return BatchedStep(batched_key(f, state), type(state), fields, mapped)


def row_kernel(step: BatchedStep[S]) -> RowKernel[S]:
    """The batched step of one model as a row kernel (a batch of one: the same bits), for a
    replay of the records it computed."""

    def run(*args: Tensor) -> list[Tensor]:
        with tracing():
            out = step.run(*(a.unsqueeze(0) for a in args))
        return [t[0] for t in out]

    return RowKernel(key=step.key, state_type=step.state_type, fields=step.fields, run=run)
