"""Bandit events: ``/decide`` now, ``/reward`` later, and default rewards for those that expire.

A decision is kept in the store as an event (:class:`~service.hosting.records.EventRecord`) for
``events.ttl_s`` seconds. Its reward is one update with the chosen action's input row, through
the update pipeline with the request id ``event:{event_id}``, so a reward is applied at most once
whatever the retries. Expired unrewarded events get the model's ``events.default_reward`` (if it
has one) from this module's own ticker.

Batches (``/decide/batch``, ``/reward/batch``). A decide batch reads the published state once
and decides every item independently against it (``policy.decide_many``; an item with a
``seed`` exactly as ``/decide`` would, the others with the work shared), each item with its own
event, kept in one store write; an item whose ``event_id`` exists gets its first answer, as a
retried ``/decide`` does, and so does a later item repeating an earlier one's ``event_id``. A
reward batch is all or nothing: every event must be known and unexpired and every reward valid
for the likelihood, else the whole batch is refused (404 or 422 naming the item's index) and
nothing is applied; then the rewards are one update through ``Updates.apply_keyed``, in order,
each event at most once (an event rewarded before, or earlier in the batch, answers
``duplicate``), with one log record and one request record per event in one atomic append.
Items x actions (decide) and items (reward) count against ``POSTSERVE_MAX_ROWS``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable

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
from service.policy import Decision, decide, decide_many
from service.schemas import (
    DecideBatchRequest,
    DecideRequest,
    RewardBatchRequest,
    RewardRequest,
    RewardResponse,
)
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

    async def decide(self, h: HostedModel, req: DecideRequest) -> bytes:
        """Choose one of the candidate actions and keep the event for its reward; the answer
        (a ``DecideResponse``) as JSON."""
        rows = _rows(h, req)
        self.limits.rows(rows, h.filter.network.input_dim, "decide")
        if req.event_id is not None:  # a retried decision gets the first answer
            seen = await self._answer_of(h, req.event_id)
            if seen is not None:
                return seen
        current = h.current
        if len(rows) == 1 and req.strategy == "thompson" and h.draw_kernel is None:
            self.catalogue.kernels.start_draws(h)  # built in the background, once
        work = self._work(h, current.state, len(rows), [req])
        choice = await self.compute.run(
            work, self._choose, h, h.filter.predict, current.state, rows, req
        )
        event_id = req.event_id or _new_ids(1)[0]
        response = answers.decision_json(event_id, choice, current.version)
        record = _record(rows, choice, req, current.version, response)
        expires = time.time() + h.spec.events.ttl_s
        if not await self.store.put_event(h.name, event_id, record, expires):
            seen = await self._answer_of(h, event_id)  # a concurrent twin won
            if seen is None:
                raise AlreadyExists(
                    f"event {event_id!r} of model {h.name!r} exists and has expired"
                )
            return seen
        return response

    async def decide_batch(self, h: HostedModel, req: DecideBatchRequest) -> bytes:
        """Decide every item against one read of the published state (see the module's
        docstring); each item's event is kept for its reward. The answer (a
        ``DecideBatchResponse``) as JSON, from each item's, encoded once."""
        rows = [_rows(h, item, f"item {i}: ") for i, item in enumerate(req.items)]
        self.limits.batch(sum(map(len, rows)), "the items' actions together")
        done = await self._answers_of(h, req.items)  # retried items: their first answers
        first: dict[str, int] = {}  # event id -> the first item with it
        todo = []
        for i, item in enumerate(req.items):
            if i not in done and (item.event_id is None or first.setdefault(item.event_id, i) == i):
                todo.append(i)
        if todo:
            current = h.current
            todo_rows, todo_items = [rows[i] for i in todo], [req.items[i] for i in todo]
            work = self._work(h, current.state, sum(map(len, todo_rows)), todo_items)
            choices = await self.compute.run(
                work, self._choose_many, h, current.state, todo_rows, todo_items
            )
            kept = await self._keep(h, todo, todo_rows, todo_items, choices, current.version)
            done.update(kept)
        for i, item in enumerate(req.items):  # a repeated event id: the first item's answer
            if i not in done and item.event_id is not None:
                done[i] = done[first[item.event_id]]
        return answers.decisions_json([done[i] for i in range(len(req.items))])

    async def _answers_of(self, h: HostedModel, items: list[DecideRequest]) -> dict[int, bytes]:
        """The first answers of the items whose event exists, by item index."""
        named = [i for i, item in enumerate(items) if item.event_id is not None]
        raws = await self.store.get_events(h.name, [str(items[i].event_id) for i in named])
        return {i: _answer(raw) for i, raw in zip(named, raws, strict=True) if raw is not None}

    async def _keep(
        self,
        h: HostedModel,
        todo: list[int],
        rows: list[list[list[float]]],
        items: list[DecideRequest],
        choices: list[Decision],
        version: int,
    ) -> dict[int, bytes]:
        """Keep the new decisions' events in one store write; their answers (JSON) by item
        index (a concurrent twin's where it won)."""
        fresh = iter(_new_ids(len(items)))
        ids = [item.event_id or next(fresh) for item in items]
        responses = [
            answers.decision_json(e, c, version) for e, c in zip(ids, choices, strict=True)
        ]
        records = [
            (e, _record(r, c, item, version, a))
            for e, r, c, item, a in zip(ids, rows, choices, items, responses, strict=True)
        ]
        expires = time.time() + h.spec.events.ttl_s
        kept = await self.store.put_events(h.name, records, expires)
        lost = [k for k, ok in enumerate(kept) if not ok]
        for k, raw in zip(
            lost, await self.store.get_events(h.name, [ids[k] for k in lost]), strict=True
        ):
            if raw is None:
                raise AlreadyExists(
                    f"item {todo[k]}: event {ids[k]!r} of model {h.name!r} exists and has expired"
                )
            responses[k] = _answer(raw)
        return dict(zip(todo, responses, strict=True))

    def _work(self, h: HostedModel, state: Belief, rows: int, items: list[DecideRequest]) -> int:
        """The compute's size in the units of an update's (state bytes x rows).

        A model linear in its parameters decides in output space: its rows are projected
        together, J Sigma J^T in one product, about a quarter of the passes over the state that
        an update row makes, so four rows count as one. A network drawn ``linearized`` decides
        in output space too, each row's Jacobian and projection about an update row's work, so
        each row counts once. Otherwise each row counts once, times the parameter draws where
        Thompson sampling draws them."""
        size = h.filter.state_bytes(state)
        if h.filter.network.linear_in_params:
            return size * -(-rows // 4)
        if h.spec.thompson == "linearized":
            return size * rows
        draws = any(item.strategy == "thompson" for item in items)
        samples = self.settings.propensity_samples if draws else 0
        return size * rows * (1 + samples)

    async def _answer_of(self, h: HostedModel, event_id: str) -> bytes | None:
        raw = await self.store.get_event(h.name, event_id)
        return None if raw is None else _answer(raw)

    def _choose(
        self,
        h: HostedModel,
        predict: Callable[[Belief], Belief],
        state: Belief,
        rows: list[list[float]],
        req: DecideRequest,
    ) -> Decision:
        """One item's decision, as ``/decide`` makes it: ``predict(state)`` is the belief."""
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        gen = torch.Generator(device=h.device).manual_seed(seed)
        return decide(
            h.filter,
            predict(state),
            h.tensor(rows),
            req.strategy,
            epsilon=req.epsilon,
            generator=gen,
            propensity_samples=self.settings.propensity_samples,
            linearized=h.spec.thompson == "linearized",
            kernel=h.draw_kernel,
        )

    def _choose_many(
        self,
        h: HostedModel,
        state: Belief,
        rows: list[list[list[float]]],
        items: list[DecideRequest],
    ) -> list[Decision]:
        """Every item's decision under one belief: a seeded item's as ``/decide`` makes it,
        the others' together (``policy.decide_many``)."""
        belief = h.filter.predict(state)
        out = {
            i: self._choose(h, lambda _: belief, state, rows[i], item)
            for i, item in enumerate(items)
            if item.seed is not None
        }
        free = [i for i, item in enumerate(items) if item.seed is None]
        if free:
            gen = torch.Generator(device=h.device).manual_seed(secrets.randbits(63))
            chosen = decide_many(
                h.filter,
                belief,
                h.tensor([row for i in free for row in rows[i]]),
                [len(rows[i]) for i in free],
                [items[i].strategy for i in free],
                [items[i].epsilon for i in free],
                generator=gen,
                propensity_samples=self.settings.propensity_samples,
                linearized=h.spec.thompson == "linearized",
            )
            out.update(zip(free, chosen, strict=True))
        return [out[i] for i in range(len(items))]

    async def reward(self, h: HostedModel, req: RewardRequest) -> RewardResponse:
        """Apply the event's reward as one update, at most once per event."""
        raw = await self.store.get_event(h.name, req.event_id)
        if raw is None:
            raise NotFound(self._unknown(h, req.event_id))
        return await self._settle(h, req.event_id, EventRecord.from_bytes(raw), req.reward)

    async def reward_batch(self, h: HostedModel, req: RewardBatchRequest) -> bytes:
        """Apply the rewards as one update, in order, each event at most once; all or nothing
        (see the module's docstring). The answer (a ``RewardBatchResponse``) as JSON."""
        ids = [item.event_id for item in req.items]
        self.limits.batch(len(ids), "one per item")
        raws = await self.store.get_events(h.name, ids)
        for i, raw in enumerate(raws):
            if raw is None:
                raise NotFound(f"item {i}: {self._unknown(h, ids[i])}; nothing was applied")
        rewards: list[float] = [item.reward for item in req.items]
        events = [EventRecord.from_bytes(raw) for raw in raws if raw is not None]
        outputs = _outputs(events)
        _check_rewards(h, rewards, outputs)
        x = [event.x for event in events]
        keys = [f"event:{e}" for e in ids]
        done = await self.updates.apply_keyed(h, x, list(rewards), keys, outputs)
        await self.store.settle_events(h.name, list(dict.fromkeys(ids)))
        return answers.rewards_json(ids, done)

    @staticmethod
    def _unknown(h: HostedModel, event_id: str) -> str:
        return (
            f"event {event_id!r} of model {h.name!r} is unknown or expired (events wait "
            f"{h.spec.events.ttl_s:g} s for their reward, events.ttl_s)"
        )

    async def _settle(
        self, h: HostedModel, event_id: str, event: EventRecord, reward: float
    ) -> RewardResponse:
        outputs = None if event.output is None else [event.output]
        entry = LogEntry([event.x], [reward], f"event:{event_id}", outputs=outputs)
        done = await self.updates.apply(h, entry)
        await self.store.settle_event(h.name, event_id)
        return answers.reward(event_id, done)

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


def _rows(h: HostedModel, req: DecideRequest, where: str = "") -> list[list[float]]:
    """The candidate input rows (context + action), each as wide as the model's input; the
    context alone where the model's outputs are the arms (no actions)."""
    context = req.context or []
    want = h.filter.network.input_dim
    if req.actions is None:
        if len(context) != want:
            raise InvalidInput(
                f"{where}decide: the context has {len(context)} values, the model takes {want}"
            )
        return [context]
    for i, action in enumerate(req.actions):
        if len(context) + len(action) != want:
            raise InvalidInput(
                f"{where}decide: context ({len(context)} values) + action {i} ({len(action)} "
                f"values) makes {len(context) + len(action)} inputs, the model takes {want}"
            )
    return [context + action for action in req.actions]


def _new_ids(n: int) -> list[str]:
    """n random event ids, 32 hex digits (128 bits) each, as ``uuid4().hex`` looks, from one
    read of the OS's random source (``uuid4`` costs 5x as much per id)."""
    raw = os.urandom(16 * n).hex()
    return [raw[k : k + 32] for k in range(0, 32 * n, 32)]


def _record(
    rows: list[list[float]], choice: Decision, req: DecideRequest, version: int, response: bytes
) -> bytes:
    """The event kept for a decision's reward: the chosen row, or the context and the chosen
    output where the outputs are the arms; with the answer (JSON) it was decided with."""
    arms_are_outputs = req.actions is None
    return EventRecord(
        x=rows[0] if arms_are_outputs else rows[choice.action],
        action=choice.action,
        propensity=choice.propensities[choice.action],
        strategy=req.strategy,
        version=version,
        response=response.decode(),
        output=choice.action if arms_are_outputs else None,
    ).to_bytes()


def _answer(raw: bytes) -> bytes:
    """The answer (JSON) a kept event was decided with."""
    return EventRecord.from_bytes(raw).response.encode()


def _outputs(events: list[EventRecord]) -> list[int] | None:
    """The output each event's reward observes alone, where the arms are the outputs (an
    event of a one-output model observes its only output, 0); None where no event's arm is
    an output."""
    if all(e.output is None for e in events):
        return None
    return [0 if e.output is None else e.output for e in events]


def _check_rewards(h: HostedModel, rewards: list[float], outputs: list[int] | None) -> None:
    """Every reward valid for the model's likelihood (of the output it observes), else
    InvalidInput naming the first bad item."""
    ks = [0] * len(rewards) if outputs is None else outputs

    def encode(k: int, r: list[float]) -> None:
        (h.filter if outputs is None else h.filter.restrict(k)).encode(h.tensor(r))

    groups: dict[int, list[int]] = {}
    for i, k in enumerate(ks):
        groups.setdefault(k, []).append(i)
    try:  # each output's rewards at once
        for k, items in groups.items():
            encode(k, [rewards[i] for i in items])
    except InvalidInput:
        for i, r in enumerate(rewards):  # the first bad item, to name it
            try:
                encode(ks[i], [r])
            except InvalidInput as exc:
                raise InvalidInput(f"item {i}: {exc.message}; nothing was applied") from exc
        raise
