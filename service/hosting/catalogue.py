"""The catalogue: which models this process hosts, and how a spec becomes a hosted model.

Create and delete go through the store's catalogue first (the store decides who wins a race
between replicas); restore at start rebuilds every model the store lists.
"""

from __future__ import annotations

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
    ) -> None:
        self.settings, self.store, self.limits = settings, store, limits
        self.compute, self.recovery, self.kernels = compute, recovery, kernels
        self.models: dict[str, HostedModel] = {}
        self.ready = False
        self._reserved = 0  # bytes of states being created

    def get(self, name: str) -> HostedModel:
        if not self.ready:
            raise NotReady("models are still being restored")
        hosted = self.models.get(name)
        if hosted is None:
            raise NotFound(f"no model named {name!r}")
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
        try:
            hosted = await self.compute.offload(self.host, spec, f)
            if not await self.store.create_model(spec.name, spec.model_dump_json().encode()):
                raise AlreadyExists(f"a model named {spec.name!r} exists")
        finally:
            self._reserved -= need
        self.models[spec.name] = hosted
        self.kernels.start(hosted)
        return hosted

    def state_bytes(self) -> int:
        """Bytes of every hosted model's state."""
        return sum(h.filter.state_bytes(h.current.state) for h in self.models.values())

    async def delete(self, name: str) -> None:
        hosted = self.get(name)
        async with hosted.lock:
            hosted.deleted = True
            self.models.pop(name, None)
            await hosted.settle()  # no pending record may land after the delete
            await self.store.delete_model(name)

    async def restore(self) -> None:
        """Host every model the store lists that is not hosted yet, at the store's latest."""
        for name, raw in sorted((await self.store.list_models()).items()):
            if name not in self.models:
                hosted = self.host(ModelSpec.model_validate_json(raw))
                await self.recovery.catch_up(hosted)
                self.models[name] = hosted
                self.kernels.start(hosted)
                log.info("restored %s at version %d", name, hosted.version)
