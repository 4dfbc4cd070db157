"""One hosted model, and the counters of what was applied and refused.

A hosted model holds its spec, its filter and a *published* pair (version, state): the pair is
replaced whole, never mutated, so a reader that takes ``hosted.current`` once sees a consistent
version and state without a lock. Writers (updates, catch-up) are serialised by ``lock``.

Between the two sit the *pending* updates (``docs/architecture.md`` section 2): computed under
the lock, each from the one before (``tip``), handed to the store, not yet known durable. The
lock is not held while they wait for their commit, so updates of one model share commits. When a
pending update's commit succeeds, it and every pending update before it are durable (each record
follows the one before it, ``Store.append(after=...)``): they are published in version order.
A failed one is never published; the ones after it fail too, and ``stale`` says the chain must be
settled and the model caught up with the store before the next write.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic

import numpy as np
import torch

from service.calibration import CalibrationTracker, Observation
from service.components import Label
from service.components.registry import Scorer
from service.errors import InvalidInput, NotOwner, PostserveError, StoreUnavailable, VersionConflict
from service.filters import Belief, OnlineFilter, RowReport, StepInfo, row_reports
from service.filters.algorithm import S
from service.filters.compiled import DrawKernel, OutputKernels, PredictKernel, RowKernel
from service.filters.likelihoods import Gaussian
from service.filters.online import RowStep
from service.influence import InfluenceLog, Influential, mark
from service.schemas import ModelSpec

__all__ = ["Counters", "Hosted", "HostedModel", "Pending", "Published"]

#: the NumPy dtype of each torch dtype that request rows are converted to on the host
_NUMPY: dict[torch.dtype, type[np.floating[Any]]] = {
    torch.float32: np.float32,
    torch.float64: np.float64,
}


@dataclass(frozen=True)
class Published(Generic[S]):
    """The belief after ``version`` observations."""

    version: int
    state: S


@dataclass
class Pending(Generic[S]):
    """An update computed from version ``after`` and handed to the store (``commit``, the task
    awaiting ``Store.append``), published once that commit is known durable."""

    after: int
    version: int
    state: S
    observations: list[Observation]
    request_ids: tuple[str, ...]  # the requests its record answers
    commit: asyncio.Future[None]


@dataclass
class Hosted(Generic[S]):
    """One hosted model. ``current`` is replaced whole by ``publish``, never mutated."""

    spec: ModelSpec
    filter: OnlineFilter[S]
    device: torch.device
    dtype: torch.dtype
    current: Published[S]
    calibration: CalibrationTracker
    scorer: Scorer  # the likelihood kind's calibration extractor
    classes: bool = False  # whether its labels are classes (a target is then one-hot)
    influence: InfluenceLog = field(default_factory=InfluenceLog)
    snapshot_version: int = 0
    snapshot_time: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    snapshotting: bool = False
    deleted: bool = False
    applied: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    pending: deque[Pending[S]] = field(default_factory=deque)
    stale: bool = False  # a write failed: settle and catch up before the next one
    failure: tuple[int, PostserveError] | None = None  # the first failed pending update
    kernel: RowKernel[S] | None = None  # its compiled step, once built (``kernels``)
    kernel_error: str | None = None  # why it has none, if building one failed
    output_kernels: OutputKernels[S] | None = None  # steps of rows of one output, once built
    output_kernels_started: bool = False  # their build began (at the first such row)
    draw_kernel: DrawKernel[S] | None = None  # compiled Thompson draws of one row, once built
    draw_kernel_started: bool = False  # its build began (at the first such decision)
    predict_kernel: PredictKernel[S] | None = None  # compiled predictive of one row, once built
    predict_kernel_started: bool = False  # its build began (at the first one-row /predict)
    batch_key: str | None = None  # its batched step's key, once it was batched or replayed

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        return self.current.version

    @property
    def tip(self) -> Published[S]:
        """What the next update computes from: the latest pending update, else the published."""
        if self.pending:
            last = self.pending[-1]
            return Published(last.version, last.state)
        return self.current

    def publish(self, version: int, state: S) -> None:
        self.current = Published(version, state)

    def pend(self, p: Pending[S]) -> None:
        """Queue ``p`` behind the other pending updates; it publishes itself once committed."""
        self.pending.append(p)
        if p.commit.done():  # committed already (``eager.started``): published now
            self._committed(p)
        else:
            p.commit.add_done_callback(lambda _: self._committed(p))

    def _committed(self, p: Pending[S]) -> None:
        """``p``'s commit finished (a done callback: it runs before anyone awaiting it)."""
        if p.commit.cancelled() or p.commit.exception() is not None:
            self.stale = True
            if self.failure is None:
                error = None if p.commit.cancelled() else p.commit.exception()
                if not isinstance(error, PostserveError):
                    error = StoreUnavailable(f"the commit of version {p.version} failed: {error}")
                self.failure = (p.version, error)
            return
        while self.pending and self.pending[0].version <= p.version:  # durable: publish in order
            q = self.pending.popleft()
            self.publish(q.version, q.state)
            # with the publish: snapshots see both or neither
            self.score(q.after, q.observations, q.request_ids)

    def pending_request(self, request_ids: Sequence[str]) -> bool:
        """Whether a pending update answers one of ``request_ids``."""
        if not request_ids or not self.pending:
            return False
        ids = set(request_ids)
        return any(not ids.isdisjoint(p.request_ids) for p in self.pending)

    def chain_error(self, p: Pending[S], error: PostserveError) -> PostserveError:
        """The error to answer for ``p``, whose commit raised ``error``: a record refused only
        because an earlier pending one failed answers with that one's error."""
        first = self.failure
        if first is None or first[0] >= p.version or not isinstance(error, VersionConflict):
            return error
        version, cause = first
        message = f"not written: the update before it (version {version}) failed: {cause.message}"
        if isinstance(cause, NotOwner | VersionConflict):
            return type(cause)(message)
        return StoreUnavailable(message)

    async def settle(self) -> None:
        """Wait for every pending commit, then forget the pending updates (the durable ones
        are published by then, the others failed). The caller holds ``lock``."""
        while self.pending:
            commits = [p.commit for p in self.pending]
            await asyncio.wait(commits)
            for p in list(self.pending):
                if p.commit.done():
                    self.pending.remove(p)
        self.failure = None

    def tensor(self, rows: Sequence[object]) -> torch.Tensor:
        """Request rows as a tensor of the model's dtype, on its device (the filter checks them:
        a number the dtype cannot hold becomes infinite, and is refused naming the range).

        Through NumPy: the same numbers as ``torch.tensor(rows, dtype)``, about three times
        faster on many rows; on the CPU straight to the dtype (one rounding, as float64 then a
        cast would round), else in float64, then cast. Ragged rows raise ValueError."""
        host = _NUMPY.get(self.dtype)
        if host is not None and self.device.type == "cpu":
            with np.errstate(over="ignore"):  # past the dtype's range: inf, refused by the filter
                return torch.from_numpy(np.array(rows, dtype=host))
        t = torch.from_numpy(np.array(rows, dtype=np.float64))
        return t.to(dtype=self.dtype, device=self.device)

    def row(self, x: list[list[float]], y: Sequence[Label]) -> tuple[torch.Tensor, torch.Tensor]:
        """One admitted row as a step takes it: x (1, I) and the encoded target (C,), of the
        model's dtype (raises InvalidInput for a label the likelihood refuses)."""
        Y = self.filter.encode(self._targets(y))
        return self.tensor(x), Y[0].to(dtype=self.dtype, device=self.device)

    def _targets(self, y: Sequence[Label]) -> torch.Tensor:
        try:
            return self.tensor(y)
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"y rows must all have the same shape: {exc}") from exc

    def step(
        self,
        state: S,
        x: list[list[float]],
        y: Sequence[Label],
        kernel: RowStep[S] | OutputKernels[S] | None = None,
        outputs: list[int] | None = None,
    ) -> tuple[S, list[RowReport], list[Observation]]:
        """One filtering step per row from ``state`` (pure), by ``kernel`` where it can, row i
        observing output ``outputs[i]`` alone where given (``kernel`` then the output kernels):
        the new state, each row's report, and what calibration scores of each row. Raises
        StepRejected / InvalidInput."""
        X, Y = self.tensor(x), self._targets(y)
        steps = kernel.steps if isinstance(kernel, OutputKernels) else kernel
        new, infos = self.filter.run(state, X, Y, steps, outputs)
        return new, *self.reported(infos, x, y, outputs)

    def reported(
        self,
        infos: list[StepInfo],
        x: list[list[float]],
        y: Sequence[Label],
        outputs: list[int] | None = None,
    ) -> tuple[list[RowReport], list[Observation]]:
        """The rows' reports on the host and what calibration scores of each, marked with its
        influence: what ``step`` answers beside the new state."""
        rows = row_reports(infos)
        obs = self.scorer(self.filter.likelihood, infos, rows, y)
        return rows, self._marked(obs, rows, x, y, outputs)

    def reported_gaussian(
        self, rows: list[RowReport], x: list[list[float]], y: Sequence[Label]
    ) -> list[Observation]:
        """``reported`` from the rows' reports alone, for a gaussian likelihood (a batched step's:
        ``service.filters.batched``), whose calibration scores read the rows' floats only."""
        assert isinstance(self.filter.likelihood, Gaussian)
        obs = self.scorer(self.filter.likelihood, [], rows, y)
        return self._marked(obs, rows, x, y, None)

    def _marked(
        self,
        obs: list[Observation],
        rows: list[RowReport],
        x: list[list[float]],
        y: Sequence[Label],
        outputs: list[int] | None,
    ) -> list[Observation]:
        """The observations with each row's influence (``service.influence``)."""
        out = []
        for i, (o, r, label) in enumerate(zip(obs, rows, y, strict=True)):
            target = _target(label, len(r.mean), self.classes)
            k = None if outputs is None else outputs[i]
            m = mark(x[i], target, r.mean, r.epistemic, r.aleatoric, k)
            out.append(Observation(o.nll, o.pit, o.z, o.probs, o.label, m))  # not replace: 3x
        return out

    def score(
        self, version: int, observations: list[Observation], request_ids: Sequence[str] = ()
    ) -> None:
        """Add the observations applied after ``version`` to the calibration window and the
        influence log: row i answers ``request_ids[i]`` when there is one id per row (keyed
        rows), else row i of the request ``request_ids[0]`` (if any)."""
        keyed = len(request_ids) == len(observations)
        for i, o in enumerate(observations):
            self.calibration.observe(o, version + i + 1)
            if o.mark is not None:
                rid = request_ids[i] if keyed else request_ids[0] if request_ids else None
                row = 0 if keyed else i
                self.influence.add(Influential(version + i + 1, rid, row, o.mark))


#: A hosted model of whichever algorithm: the hosting layer knows only that its state is a belief.
HostedModel = Hosted[Belief]


@dataclass
class Counters:
    """Observations applied and update requests refused (by error code), over all models since
    start; the per-model figures live on each :class:`Hosted`. The one place that counts."""

    applied: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def note_applied(self, h: Hosted[S], rows: int) -> None:
        h.applied += rows
        self.applied += rows

    def note_rejected(self, h: Hosted[S] | None, code: str) -> None:
        self.rejected[code] += 1
        if h is not None:
            h.rejected[code] += 1


def _target(label: Label, C: int, classes: bool) -> list[float]:
    """A label as the likelihood's target in output space: a class as [y] (bernoulli, C = 1) or
    one-hot, else its numbers."""
    if classes:
        k = int(label)  # type: ignore[arg-type]
        return [float(k)] if C == 1 else [float(j == k) for j in range(C)]
    return [float(v) for v in label] if isinstance(label, list) else [float(label)]
