"""The catalogue: which models this process hosts, and how a spec becomes a hosted model.

Create and delete go through the store's catalogue first (the store decides who wins a race
between replicas); restore at start rebuilds every model the store lists. When replicas share
the store (Redis), a name this replica does not host is looked up there (``fetch``): a model
another replica created after this one restored is hosted here at the store's latest the first
time traffic for it arrives (its replica died, or the ingress moved it on a scale-up).
"""

from __future__ import annotations

import asyncio
import logging

import torch

from service.calibration import CalibrationTracker
from service.components import LIKELIHOODS
from service.components.build import DTYPES, build_filter, resolve_device, state_bytes_estimate
from service.config import Settings
from service.errors import AlreadyExists, InvalidInput, InvalidSpec, NotFound, NotReady
from service.filters import Belief, OnlineFilter
from service.hosting.compute import Compute
from service.hosting.hosted import Hosted, HostedModel, Published
from service.hosting.kernels import Kernels
from service.hosting.limits import Limits
from service.hosting.recovery import Recovery
from service.influence import InfluenceLog
from service.schemas import ModelSpec
from service.store import Store

__all__ = ["Catalogue"]

log = logging.getLogger("postserve.hosting")


class Catalogue:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        limits: Limits,
        compute: Compute,
        recovery: Recovery,
        kernels: Kernels,
        *,
        shared: bool = False,
    ) -> None:
        self.settings, self.store, self.limits = settings, store, limits
        self.compute, self.recovery, self.kernels = compute, recovery, kernels
        self.shared = shared  # other replicas create and write models in the same store
        self.models: dict[str, HostedModel] = {}
        self.ready = False
        self._reserved = 0  # bytes of states being created
        self._bytes = 0  # of every hosted model's state (their shapes never change)
        self._busy: set[str] = set()  # names being created or deleted here
        self._looking: dict[str, asyncio.Future[HostedModel]] = {}  # names being looked up

    def get(self, name: str) -> HostedModel:
        if not self.ready:
            raise NotReady("models are still being restored")
        hosted = self.models.get(name)
        if hosted is None:
            raise NotFound(f"no model named {name!r}")
        return hosted

    async def fetch(self, name: str) -> HostedModel:
        """``get``; or, when replicas share the store, a model another replica created after
        this one restored, hosted now at the store's latest (concurrent requests for it wait for
        one lookup). NotFound if the store has no such model either."""
        hosted = self.models.get(name)
        if hosted is not None and self.ready:
            return hosted
        if not self.shared or not self.ready or name in self._busy:
            return self.get(name)
        looking = self._looking.get(name)
        if looking is None:
            looking = self._looking[name] = asyncio.ensure_future(self._adopt(name))
            looking.add_done_callback(lambda _: self._looking.pop(name, None))
        return await asyncio.shield(looking)

    async def _adopt(self, name: str) -> HostedModel:
        raw = await self.store.get_model(name)
        if raw is None or name in self._busy:
            return self.get(name)  # NotFound, or hosted meanwhile
        if name in self.models:
            return self.models[name]
        hosted = await self.compute.offload(self.host, ModelSpec.model_validate_json(raw))
        async with hosted.lock:
            await self.recovery.catch_up(hosted)
        if name in self.models or name in self._busy:  # created or deleted here meanwhile
            return self.get(name)
        self._add(hosted)
        log.info("hosting %s (created by another replica) at version %d", name, hosted.version)
        return hosted

    def find(self, name: str) -> HostedModel | None:
        """The model if hosted (restored or not), else None; never raises."""
        return self.models.get(name)

    def names(self) -> list[str]:
        if not self.ready:
            raise NotReady("models are still being restored")
        return sorted(self.models)

    def all(self) -> list[HostedModel]:
        return list(self.models.values())

    def monitored(self) -> list[HostedModel]:
        return [h for h in self.models.values() if h.spec.monitor]

    def plan(self, spec: ModelSpec) -> tuple[OnlineFilter[Belief], int]:
        """The filter a spec describes and the bytes its state will take, before allocating it
        (refused if over the per-model limit)."""
        f = build_filter(spec)
        need = state_bytes_estimate(spec, f.network)
        self.limits.state(need)
        return f, need

    def host(self, spec: ModelSpec, planned: OnlineFilter[Belief] | None = None) -> HostedModel:
        """Build the model a spec describes at its prior (not yet in the catalogue)."""
        f = planned if planned is not None else self.plan(spec)[0]
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
        return Hosted(
            spec=spec,
            filter=f,
            device=device,
            dtype=dtype,
            current=Published(0, f.init(dtype=dtype, device=device)),
            calibration=CalibrationTracker(self.settings.calibration_window),
            influence=InfluenceLog(
                self.settings.influence_window, typecode="d" if dtype == torch.float64 else "f"
            ),
            scorer=LIKELIHOODS[spec.likelihood.type].score,
            classes=LIKELIHOODS[spec.likelihood.type].classes,
        )

    async def create(self, spec: ModelSpec) -> HostedModel:
        if not self.ready:
            raise NotReady("models are still being restored")
        if spec.name in self.models:
            raise AlreadyExists(f"a model named {spec.name!r} exists")
        if spec.monitor:
            self.limits.monitored(len(self.monitored()))
        f, need = self.plan(spec)
        self.limits.budget(self.state_bytes() + self._reserved, need)
        self._reserved += need  # held until hosted, so that two creates cannot both fit
        self._busy.add(spec.name)
        try:
            hosted = await self.compute.offload(self.host, spec, f)
            if not await self.store.create_model(spec.name, spec.model_dump_json().encode()):
                raise AlreadyExists(f"a model named {spec.name!r} exists")
        finally:
            self._reserved -= need
            self._busy.discard(spec.name)
        self._add(hosted)
        return hosted

    def state_bytes(self) -> int:
        """Bytes of every hosted model's state (kept as models come and go: a sum over 10,000
        models at each create made creating them quadratic)."""
        return self._bytes

    def _add(self, hosted: HostedModel) -> None:
        self.models[hosted.name] = hosted
        self._bytes += hosted.filter.state_bytes(hosted.current.state)
        self.kernels.start(hosted)

    def _remove(self, hosted: HostedModel) -> bool:
        """Stop hosting ``hosted`` (marked deleted); whether it was the one hosted by its name."""
        hosted.deleted = True
        if self.models.get(hosted.name) is not hosted:
            return False
        del self.models[hosted.name]
        self._bytes -= hosted.filter.state_bytes(hosted.current.state)
        return True

    def drop(self, hosted: HostedModel) -> None:
        """Stop hosting a model the store no longer has (another replica deleted it)."""
        if self._remove(hosted):
            log.info("%s was deleted by another replica; no longer hosted here", hosted.name)

    async def delete(self, name: str) -> None:
        hosted = self.get(name)
        self._busy.add(name)
        try:
            async with hosted.lock:
                self._remove(hosted)
                await hosted.settle()  # no pending record may land after the delete
                await self.store.delete_model(name)
        finally:
            self._busy.discard(name)

    async def restore(self) -> None:
        """Host every model the store lists that is not hosted yet, at the store's latest."""
        for name, raw in sorted((await self.store.list_models()).items()):
            if name not in self.models:
                hosted = self.host(ModelSpec.model_validate_json(raw))
                await self.recovery.catch_up(hosted)
                self._add(hosted)
                log.info("restored %s at version %d", name, hosted.version)
