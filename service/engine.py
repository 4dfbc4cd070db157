"""The engine: hosted models, the write-ahead update protocol, snapshots and recovery.

Each hosted model holds its spec, its filter and a *published* pair (version, state). Updates to a
model are serialised by its lock; predictions read the published pair without a lock (states are
immutable, publishing is one reference swap). The update protocol (architecture.md section 2):

1. validate the request against the model (dimensions, labels);
2. under the model's lock, compute the new state off the event loop, not yet visible;
3. a non-finite / non-PSD result raises StepRejected: nothing changes;
4. append the observation record (and the response, for ``request_id``) to the store; if that
   fails, StoreUnavailable and the old state stays;
5. publish (version + rows, new state) and answer.

Snapshots run in the background every ``snapshot_every`` observations or ``snapshot_interval_s``
seconds; the store trims the log up to the snapshot. At start every model in the catalogue is
restored from its latest snapshot plus a replay of the log after it, which reproduces the state
bit for bit on the same device and dtype (each row is the same deterministic step).

Each applied row's pre-update prediction is scored against its label in the model's calibration
window (``service.calibration``) when it is published; the window travels in the snapshot
metadata, and replay after the snapshot refills the rest, so it survives a restart too. Counters
of applied and rejected updates live here as plain numbers; ``service.metrics`` reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
import torch

from service.calibration import LEVELS, CalibrationTracker, Observation, Stats
from service.config import Settings
from service.errors import (
    AlreadyExists,
    InvalidInput,
    InvalidSpec,
    LimitReached,
    NotFound,
    NotOwner,
    NotReady,
    PostserveError,
    StepRejected,
    StoreUnavailable,
    TooLarge,
)
from service.filters import OnlineFilter
from service.models import (
    DTYPES,
    build_filter,
    decode_state,
    encode_state,
    observations,
    resolve_device,
    state_bytes_estimate,
)
from service.policy import decide
from service.schemas import (
    CalibrationPoint,
    CalibrationResponse,
    CalibrationSummary,
    DecideRequest,
    DecideResponse,
    ModelInfo,
    ModelSpec,
    PredictRequest,
    PredictResponse,
    ReliabilityBin,
    RewardRequest,
    RewardResponse,
    RowPrediction,
    SnapshotResponse,
    UpdateRequest,
    UpdateResponse,
)
from service.store import Backend, Snapshot

__all__ = ["Engine", "Hosted"]

log = logging.getLogger("postserve.engine")


@dataclass
class Hosted:
    """One hosted model. ``current`` = (version, state) is replaced whole, never mutated."""

    spec: ModelSpec
    filter: OnlineFilter
    device: torch.device
    dtype: torch.dtype
    current: tuple[int, Any]
    calibration: CalibrationTracker
    snapshot_version: int = 0
    snapshot_time: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    snapshotting: bool = False
    deleted: bool = False
    applied: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def version(self) -> int:
        return self.current[0]


#: Work below this (state bytes x rows) runs on the event loop: a thread hop costs ~85 us here,
#: more than a small model's whole step. Anything larger goes to a worker thread.
INLINE_WORK = 1 << 18

T = TypeVar("T")


async def _compute(
    h: Hosted, rows: int, limiter: anyio.CapacityLimiter, fn: Callable[..., T], *args: Any
) -> T:
    """Run ``fn(*args)`` inline when it is small, else off the event loop in at most
    ``limiter`` threads at a time (more than one per core only adds contention)."""
    if h.filter.state_bytes(h.current[1]) * rows <= INLINE_WORK:
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _tensor(rows: list[Any], like: Hosted) -> torch.Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


class Engine:
    """Owns the hosted models; every public method is one API operation."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.store = backend.store
        self.lease = backend.lease
        self.models: dict[str, Hosted] = {}
        self.ready = False
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._limiter = anyio.CapacityLimiter(settings.compute_threads or _cores())
        self.applied = 0  # observations applied, all models, since start
        self.rejected: Counter[str] = Counter()  # rejected update requests by error code

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and restore every model (snapshot + log replay); then ready."""
        torch.set_num_threads(self.settings.threads)
        await self.store.open()
        self._ticker = asyncio.create_task(self._restore_then_tick())

    async def _restore_then_tick(self) -> None:
        """Restore every model, retrying while the store is unreachable; then ready."""
        while True:
            try:
                for name, raw in sorted((await self.store.list_models()).items()):
                    if name not in self.models:
                        self.models[name] = await self._restore(ModelSpec.model_validate_json(raw))
                        log.info("restored %s at version %d", name, self.models[name].version)
                break
            except StoreUnavailable as exc:
                log.warning("restore waits for the store: %s", exc)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("restoring the models failed; retrying in 5 s")
                await asyncio.sleep(5.0)
        self.ready = True
        await self._tick()

    async def stop(self) -> None:
        self.ready = False
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        for name, h in list(self.models.items()):  # a clean stop leaves nothing to replay
            if h.version > h.snapshot_version:
                try:
                    await self._snapshot(name, h)
                except NotOwner:
                    pass
                except Exception:
                    log.exception("final snapshot of %s failed", name)
        await self.store.close()

    async def _restore(self, spec: ModelSpec) -> Hosted:
        hosted = self._host(spec)
        await self._catch_up(hosted)
        return hosted

    async def _catch_up(self, h: Hosted) -> None:
        """Bring h to the store's latest: a newer snapshot if there is one, then the log after it.

        Runs at start, and when this replica takes over a model another replica was writing.
        """
        name = h.spec.name
        snap = await self.store.get_snapshot(name)
        if snap is not None and snap.version > h.version:
            meta = json.loads(snap.meta)
            state = decode_state(snap.tensors, meta["algorithm"], h.dtype, h.device)
            h.current = (snap.version, state)
            h.snapshot_version = snap.version
            if "calibration" in meta:
                h.calibration = CalibrationTracker.from_dict(meta["calibration"])
        for rec in await self.store.read_log(name, after=h.version):
            body = json.loads(rec.record)
            version, state = h.current
            if version + len(body["x"]) != rec.version:
                raise RuntimeError(
                    f"log of {name!r} is inconsistent: record {rec.version} follows {version}"
                )
            new, obs = await anyio.to_thread.run_sync(self._replay, h, state, body)
            h.current = (rec.version, new)
            self._score(h, version, obs)

    @staticmethod
    def _replay(h: Hosted, state: Any, body: dict[str, Any]) -> tuple[Any, list[Observation]]:
        new, infos = h.filter.run(state, _tensor(body["x"], h), _tensor(body["y"], h))
        return new, observations(h.filter, infos, body["y"])

    @staticmethod
    def _score(h: Hosted, version: int, obs: list[Observation]) -> None:
        for i, o in enumerate(obs, start=1):
            h.calibration.observe(o, version + i)

    def _host(self, spec: ModelSpec) -> Hosted:
        f = build_filter(spec)
        f.likelihood.check_output_dim(f.network.output_dim)
        need = state_bytes_estimate(spec, f.num_params)
        if need > self.settings.max_state_bytes:
            raise TooLarge(
                f"the state of this model would take {need} bytes, over the limit of "
                f"{self.settings.max_state_bytes} (POSTSERVE_MAX_STATE_BYTES)"
            )
        default = spec.events.default_reward
        if default is not None:
            try:
                f.encode(torch.tensor([default], dtype=torch.float64))
            except InvalidInput as exc:
                raise InvalidSpec(
                    f"events.default_reward {default:g} is not a label: {exc}"
                ) from exc
        device = resolve_device(spec.device, self.settings.device)
        dtype = DTYPES[spec.dtype]
        tracker = CalibrationTracker(self.settings.calibration_window)
        return Hosted(spec, f, device, dtype, (0, f.init(dtype=dtype, device=device)), tracker)

    # -- catalogue ---------------------------------------------------------------------------

    def _get(self, name: str) -> Hosted:
        if not self.ready:
            raise NotReady("models are still being restored")
        hosted = self.models.get(name)
        if hosted is None:
            raise NotFound(f"no model named {name!r}")
        return hosted

    def info(self, name: str) -> ModelInfo:
        h = self._get(name)
        version, state = h.current
        return ModelInfo(
            name=name,
            spec=h.spec,
            version=version,
            num_params=h.filter.num_params,
            state_bytes=h.filter.state_bytes(state),
            snapshot_version=h.snapshot_version,
            device=str(h.device),
            calibration=_summary(h.calibration.stats()),
        )

    def calibration(self, name: str) -> CalibrationResponse:
        """The model's calibration window: figures, histograms and its recent history."""
        h = self._get(name)
        stats = h.calibration.stats()
        classes = h.spec.likelihood.type in ("bernoulli", "categorical")
        return CalibrationResponse(
            name=name,
            likelihood=h.spec.likelihood.type,
            version=h.version,
            window=h.calibration.window,
            levels=list(LEVELS),
            summary=_summary(stats),
            pit_histogram=stats.pit_histogram,
            reliability=[ReliabilityBin(**b) for b in stats.reliability()] if classes else None,
            history=[
                CalibrationPoint(version=v, summary=_summary(s)) for v, s in h.calibration.history
            ],
        )

    @property
    def monitored(self) -> list[Hosted]:
        return [h for h in self.models.values() if h.spec.monitor]

    def list_models(self) -> list[ModelInfo]:
        if not self.ready:
            raise NotReady("models are still being restored")
        return [self.info(name) for name in sorted(self.models)]

    async def create(self, spec: ModelSpec) -> ModelInfo:
        if not self.ready:
            raise NotReady("models are still being restored")
        if spec.name in self.models:
            raise AlreadyExists(f"a model named {spec.name!r} exists")
        if spec.monitor and len(self.monitored) >= self.settings.max_monitored_models:
            raise LimitReached(
                f"{self.settings.max_monitored_models} models already have monitor: true, the "
                "limit (POSTSERVE_MAX_MONITORED_MODELS); create this one without it"
            )
        hosted = await anyio.to_thread.run_sync(self._host, spec)
        if not await self.store.create_model(spec.name, spec.model_dump_json().encode()):
            raise AlreadyExists(f"a model named {spec.name!r} exists")
        self.models[spec.name] = hosted
        return self.info(spec.name)

    async def delete(self, name: str) -> None:
        hosted = self._get(name)
        async with hosted.lock:
            hosted.deleted = True
            self.models.pop(name, None)
            await self.store.delete_model(name)

    # -- update / predict --------------------------------------------------------------------

    def _check_rows(self, h: Hosted, x: list[list[float]], what: str) -> None:
        if len(x) > self.settings.max_rows:
            raise TooLarge(
                f"{len(x)} rows is over the limit of {self.settings.max_rows} per request "
                "(POSTSERVE_MAX_ROWS)"
            )
        want = h.filter.network.input_dim
        for i, row in enumerate(x):
            if len(row) != want:
                raise InvalidInput(
                    f"{what}: row {i} of x has {len(row)} values, the model takes {want}"
                )

    async def update(self, name: str, req: UpdateRequest) -> UpdateResponse:
        try:
            return await self._update(name, req)
        except PostserveError as exc:
            if not isinstance(exc, NotReady):
                self.note_rejected(name, exc.code)
            raise

    def note_rejected(self, name: str, code: str) -> None:
        """Count an update request refused with error ``code`` (here or at the HTTP edge)."""
        self.rejected[code] += 1
        h = self.models.get(name)
        if h is not None:
            h.rejected[code] += 1

    async def _update(self, name: str, req: UpdateRequest) -> UpdateResponse:
        h = self._get(name)
        self._check_rows(h, req.x, "update")
        if len(req.y) != len(req.x):
            raise InvalidInput(f"x has {len(req.x)} rows but y has {len(req.y)}")
        async with h.lock:
            if h.deleted:
                raise NotFound(f"no model named {name!r}")
            if await self.lease.acquire(name):  # newly the writer: catch up with the log first
                await self._catch_up(h)
            if req.request_id is not None:
                first = await self.store.get_response(name, req.request_id)
                if first is not None:
                    return UpdateResponse.model_validate_json(first).model_copy(
                        update={"duplicate": True}
                    )
            version, state = h.current
            new, infos, obs = await _compute(
                h, len(req.x), self._limiter, self._step, h, state, req
            )
            n = len(req.x)
            response = UpdateResponse(
                version=version + n,
                applied=n,
                predictions=[
                    RowPrediction(
                        mean=i.predictive.mean[0].tolist(),
                        variance=i.predictive.variance[0].tolist(),
                    )
                    for i in infos
                ],
                log_likelihood=[float(i.log_likelihood) for i in infos],
            )
            record = json.dumps({"x": req.x, "y": req.y, "request_id": req.request_id}).encode()
            await self.store.append(
                name,
                version + n,
                record,
                req.request_id,
                response.model_dump_json().encode() if req.request_id is not None else None,
            )
            h.current = (version + n, new)
            self._score(h, version, obs)  # with the publish: snapshots see both or neither
            h.applied += n
            self.applied += n
        if version + n - h.snapshot_version >= self.settings.snapshot_every:
            self._spawn_snapshot(h)
        return response

    @staticmethod
    def _step(
        h: Hosted, state: Any, req: UpdateRequest
    ) -> tuple[Any, list[Any], list[Observation]]:
        x = _tensor(req.x, h)
        try:
            y = _tensor(req.y, h)
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"y rows must all have the same shape: {exc}") from exc
        new, infos = h.filter.run(state, x, y)
        return new, infos, observations(h.filter, infos, req.y)

    async def predict(self, name: str, req: PredictRequest) -> PredictResponse:
        h = self._get(name)
        self._check_rows(h, req.x, "predict")
        if req.num_samples > self.settings.max_samples:
            raise TooLarge(
                f"num_samples {req.num_samples} is over the limit of {self.settings.max_samples} "
                "(POSTSERVE_MAX_SAMPLES)"
            )
        version, state = h.current
        rows = len(req.x) * (1 + req.num_samples)
        return await _compute(h, rows, self._limiter, self._predict, h, version, state, req)

    @staticmethod
    def _predict(h: Hosted, version: int, state: Any, req: PredictRequest) -> PredictResponse:
        f = h.filter
        x = _tensor(req.x, h)
        ahead = f.predict(state)  # the one-step-ahead belief p(theta_{t+1} | D_{1:t})
        pred = f.predictive(ahead, x)
        draws = torch.empty(0)
        if req.num_samples:
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            gen = torch.Generator(device=h.device).manual_seed(seed)
            draws = f.sample_outputs(ahead, x, req.num_samples, gen)
        for t in (pred.mean, pred.epistemic, pred.aleatoric, draws):
            if not bool(torch.isfinite(t).all()):
                raise InvalidInput(
                    "the prediction for these inputs is not finite (values too large for the "
                    f"model's {h.spec.dtype} arithmetic)"
                )
        samples: list[list[list[float]]] = draws.tolist() if req.num_samples else []
        return PredictResponse(
            version=version,
            mean=pred.mean.tolist(),
            variance=pred.variance.tolist(),
            epistemic_variance=pred.epistemic.tolist(),
            aleatoric_variance=pred.aleatoric.tolist(),
            samples=samples,
        )

    # -- bandits: decide now, reward later ----------------------------------------------------

    async def decide(self, name: str, req: DecideRequest) -> DecideResponse:
        """Choose one of the candidate actions and keep the event for its reward."""
        h = self._get(name)
        context = req.context or []
        want = h.filter.network.input_dim
        for i, action in enumerate(req.actions):
            if len(context) + len(action) != want:
                raise InvalidInput(
                    f"decide: context ({len(context)} values) + action {i} ({len(action)} values) "
                    f"makes {len(context) + len(action)} inputs, the model takes {want}"
                )
        rows = [context + action for action in req.actions]
        self._check_rows(h, rows, "decide")
        if req.event_id is not None:  # a retried decision gets the first answer
            seen = await self.store.get_event(name, req.event_id)
            if seen is not None:
                return DecideResponse.model_validate_json(json.loads(seen)["response"])
        version, state = h.current
        draws = req.strategy == "thompson" and not h.filter.outputs_linear
        work = len(rows) * (1 + (self.settings.propensity_samples if draws else 0))
        choice = await _compute(h, work, self._limiter, self._decide, h, state, rows, req)
        event_id = req.event_id or uuid.uuid4().hex
        response = DecideResponse(
            event_id=event_id,
            action=choice.action,
            scores=choice.scores,
            propensity=choice.propensities[choice.action],
            propensities=choice.propensities,
            propensity_samples=choice.samples,
            version=version,
        )
        record = {
            "x": rows[choice.action],
            "action": choice.action,
            "propensity": response.propensity,
            "strategy": req.strategy,
            "version": version,
            "response": response.model_dump_json(),
        }
        expires = time.time() + h.spec.events.ttl_s
        if not await self.store.put_event(name, event_id, json.dumps(record).encode(), expires):
            seen = await self.store.get_event(name, event_id)  # a concurrent twin won
            if seen is None:
                raise AlreadyExists(f"event {event_id!r} of model {name!r} exists and has expired")
            return DecideResponse.model_validate_json(json.loads(seen)["response"])
        return response

    def _decide(self, h: Hosted, state: Any, rows: list[list[float]], req: DecideRequest) -> Any:
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        gen = torch.Generator(device=h.device).manual_seed(seed)
        return decide(
            h.filter,
            h.filter.predict(state),
            _tensor(rows, h),
            req.strategy,
            epsilon=req.epsilon,
            generator=gen,
            propensity_samples=self.settings.propensity_samples,
        )

    async def reward(self, name: str, req: RewardRequest) -> RewardResponse:
        """Apply the event's reward as one update, at most once per event."""
        h = self._get(name)
        raw = await self.store.get_event(name, req.event_id)
        if raw is None:
            raise NotFound(
                f"event {req.event_id!r} of model {name!r} is unknown or expired (events wait "
                f"{h.spec.events.ttl_s:g} s for their reward, events.ttl_s)"
            )
        return await self._apply_reward(name, req.event_id, json.loads(raw), req.reward)

    async def _apply_reward(
        self, name: str, event_id: str, event: dict[str, Any], reward: float
    ) -> RewardResponse:
        update = UpdateRequest(x=[event["x"]], y=[reward], request_id=f"event:{event_id}")
        done = await self.update(name, update)
        await self.store.settle_event(name, event_id)
        return RewardResponse(
            event_id=event_id,
            applied=not done.duplicate,
            duplicate=done.duplicate,
            version=done.version,
        )

    async def _expire_events(self) -> None:
        """Give expired unrewarded events their model's default reward (if it has one)."""
        now = time.time()
        for name, h in list(self.models.items()):
            default = h.spec.events.default_reward
            try:
                for event_id, raw in await self.store.expired_events(name, now):
                    if default is not None:
                        try:
                            await self._apply_reward(name, event_id, json.loads(raw), default)
                            continue
                        except StepRejected as exc:  # the state stays; so does nothing else
                            log.warning("default reward of %s/%s refused: %s", name, event_id, exc)
                    await self.store.settle_event(name, event_id)
            except (NotOwner, StoreUnavailable, NotFound):
                continue  # another replica writes it, or the store is away: next tick
            except Exception:
                log.exception("default rewards of %s failed", name)

    # -- snapshots ---------------------------------------------------------------------------

    async def snapshot(self, name: str) -> SnapshotResponse:
        h = self._get(name)
        async with h.lock:
            if await self.lease.acquire(name):
                await self._catch_up(h)
        size = await self._snapshot(name, h)
        return SnapshotResponse(name=name, version=h.snapshot_version, bytes=size)

    async def _snapshot(self, name: str, h: Hosted) -> int:
        version, state = h.current
        extra = {"calibration": h.calibration.to_dict()}  # taken with the state it belongs to
        tensors, meta = await anyio.to_thread.run_sync(
            encode_state, state, version, h.spec.filter.type, extra
        )
        if not h.deleted:
            await self.store.put_snapshot(name, Snapshot(version, tensors, meta))
            h.snapshot_version = max(h.snapshot_version, version)
            h.snapshot_time = time.monotonic()
        return len(tensors) + len(meta)

    def _spawn_snapshot(self, h: Hosted) -> None:
        if h.snapshotting:
            return
        h.snapshotting = True

        async def run() -> None:
            try:
                await self._snapshot(h.spec.name, h)
            except NotOwner:
                log.debug("skipped the snapshot of %s: another replica writes it", h.spec.name)
            except Exception:
                log.exception("snapshot of %s failed", h.spec.name)
            finally:
                h.snapshotting = False

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tick(self) -> None:
        period = self.settings.snapshot_interval_s
        while True:
            await asyncio.sleep(min(period, 5.0))
            now = time.monotonic()
            for h in list(self.models.values()):
                if h.version > h.snapshot_version and now - h.snapshot_time >= period:
                    self._spawn_snapshot(h)
            await self._expire_events()


def _summary(stats: Stats) -> CalibrationSummary:
    return CalibrationSummary(**stats.summary())
