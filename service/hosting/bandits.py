"""Bandit events: ``/decide`` now, ``/reward`` later, and default rewards for those that expire.

A decision is kept in the store as an event (:class:`~service.hosting.records.EventRecord`) for
``events.ttl_s`` seconds. Its reward is one update with the chosen action's input row, through
the update pipeline with the request id ``event:{event_id}``, so a reward is applied at most once
whatever the retries. Expired unrewarded events get the model's ``events.default_reward`` (if it
has one) from this module's own ticker.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid

import torch

from service.config import Settings
from service.errors import (
    AlreadyExists,
    InvalidInput,
    NotFound,
    NotOwner,
    StepRejected,
    StoreUnavailable,
)
from service.filters import Belief
from service.hosting import answers
from service.hosting.catalogue import Catalogue
from service.hosting.compute import Compute
from service.hosting.hosted import HostedModel
from service.hosting.limits import Limits
from service.hosting.records import EventRecord, LogEntry
from service.hosting.updates import Updates
from service.policy import Decision, decide
from service.schemas import DecideRequest, DecideResponse, RewardRequest, RewardResponse
from service.store import Store

__all__ = ["Bandits"]

log = logging.getLogger("postserve.hosting")


class Bandits:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        catalogue: Catalogue,
        limits: Limits,
        compute: Compute,
        updates: Updates,
    ) -> None:
        self.settings, self.store, self.catalogue = settings, store, catalogue
        self.limits, self.compute, self.updates = limits, compute, updates

    async def decide(self, h: HostedModel, req: DecideRequest) -> DecideResponse:
        """Choose one of the candidate actions and keep the event for its reward."""
        context = req.context or []
        want = h.filter.network.input_dim
        for i, action in enumerate(req.actions):
            if len(context) + len(action) != want:
                raise InvalidInput(
                    f"decide: context ({len(context)} values) + action {i} ({len(action)} values) "
                    f"makes {len(context) + len(action)} inputs, the model takes {want}"
                )
        rows = [context + action for action in req.actions]
        self.limits.rows(rows, want, "decide")
        if req.event_id is not None:  # a retried decision gets the first answer
            seen = await self._answer_of(h, req.event_id)
            if seen is not None:
                return seen
        current = h.current
        draws = req.strategy == "thompson" and not h.filter.network.linear_in_params
        samples = self.settings.propensity_samples if draws else 0
        work = h.filter.state_bytes(current.state) * len(rows) * (1 + samples)
        choice = await self.compute.run(work, self._choose, h, current.state, rows, req)
        event_id = req.event_id or uuid.uuid4().hex
        response = answers.decision(event_id, choice, current.version)
        record = EventRecord(
            x=rows[choice.action],
            action=choice.action,
            propensity=response.propensity,
            strategy=req.strategy,
            version=current.version,
            response=response.model_dump_json(),
        )
        expires = time.time() + h.spec.events.ttl_s
        if not await self.store.put_event(h.name, event_id, record.to_bytes(), expires):
            seen = await self._answer_of(h, event_id)  # a concurrent twin won
            if seen is None:
                raise AlreadyExists(
                    f"event {event_id!r} of model {h.name!r} exists and has expired"
                )
            return seen
        return response

    async def _answer_of(self, h: HostedModel, event_id: str) -> DecideResponse | None:
        raw = await self.store.get_event(h.name, event_id)
        if raw is None:
            return None
        return DecideResponse.model_validate_json(EventRecord.from_bytes(raw).response)

    def _choose(
        self, h: HostedModel, state: Belief, rows: list[list[float]], req: DecideRequest
    ) -> Decision:
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        gen = torch.Generator(device=h.device).manual_seed(seed)
        return decide(
            h.filter,
            h.filter.predict(state),
            h.tensor(rows),
            req.strategy,
            epsilon=req.epsilon,
            generator=gen,
            propensity_samples=self.settings.propensity_samples,
        )

    async def reward(self, h: HostedModel, req: RewardRequest) -> RewardResponse:
        """Apply the event's reward as one update, at most once per event."""
        raw = await self.store.get_event(h.name, req.event_id)
        if raw is None:
            raise NotFound(
                f"event {req.event_id!r} of model {h.name!r} is unknown or expired (events wait "
                f"{h.spec.events.ttl_s:g} s for their reward, events.ttl_s)"
            )
        return await self._settle(h, req.event_id, EventRecord.from_bytes(raw), req.reward)

    async def _settle(
        self, h: HostedModel, event_id: str, event: EventRecord, reward: float
    ) -> RewardResponse:
        entry = LogEntry(x=[event.x], y=[reward], request_id=f"event:{event_id}")
        done = await self.updates.apply(h, entry)
        await self.store.settle_event(h.name, event_id)
        return RewardResponse(
            event_id=event_id,
            applied=not done.duplicate,
            duplicate=done.duplicate,
            version=done.version,
        )

    async def expire(self) -> None:
        """Give expired unrewarded events their model's default reward (if it has one)."""
        now = time.time()
        for h in self.catalogue.all():
            default = h.spec.events.default_reward
            try:
                for event_id, raw in await self.store.expired_events(h.name, now):
                    if default is not None:
                        try:
                            await self._settle(h, event_id, EventRecord.from_bytes(raw), default)
                            continue
                        except StepRejected as exc:  # the state stays; so does nothing else
                            log.warning(
                                "default reward of %s/%s refused: %s", h.name, event_id, exc
                            )
                    await self.store.settle_event(h.name, event_id)
            except (NotOwner, StoreUnavailable, NotFound):
                continue  # another replica writes it, or the store is away: next tick
            except Exception:
                log.exception("default rewards of %s failed", h.name)

    async def tick(self) -> None:
        """Forever: settle expired events, every ``min(snapshot_interval_s, 5)`` seconds (the
        snapshots' cadence)."""
        while True:
            await asyncio.sleep(min(self.settings.snapshot_interval_s, 5.0))
            await self.expire()
