"""``/decide/batch`` and ``/reward/batch``: in the app in this process, and end to end against a
real server process (sqlite, through a crash) with both clients.

Independent truths: a seeded item must get exactly what ``/decide`` with that seed answers; the
unseeded items' decisions must follow Thompson sampling's law, their arg-max shares over
posterior draws taken through ``/predict`` (whose samples share one theta across rows); a reward
batch must change the model exactly (bit for bit) as the same rewards posted one at a time to a
twin decided alike (to rounding for the Kalman filter, whose batch is one block update); a
refused batch must change nothing.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from service.client import AsyncClient, Client, PostserveHTTPError
from service.testing import MakeAppClient, MakeServer, linear_spec, mlp_spec

CONTEXT = [0.5, -1.0]
ACTIONS = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]]
PROBE = [CONTEXT + a for a in ACTIONS]

SPECS: dict[str, dict[str, Any]] = {
    "kalman": linear_spec(
        "m", 5, bias=False, likelihood={"type": "gaussian", "noise_variance": 0.5},
        filter="kalman", dtype="float64",
    ),
    "linear-lofi": linear_spec(
        "m", 5, likelihood={"type": "gaussian", "noise_variance": 0.5},
        filter={"type": "lofi", "rank": 2}, dtype="float64",
    ),
    "mlp": mlp_spec(
        "m", 5, [8], likelihood={"type": "gaussian", "noise_variance": 0.5},
        filter={"type": "lofi", "rank": 3}, dtype="float64", prior={"variance": 0.5},
        thompson="parameters",  # the law /predict's samples draw (theta through the network)
    ),
}  # fmt: skip


def spec(kind: str, name: str, **extra: Any) -> dict[str, Any]:
    return {**SPECS[kind], "name": name, **extra}


@pytest.fixture
def client(app_client: MakeAppClient) -> Iterator[Client]:
    h = app_client()
    with Client(str(h.base_url), transport=h.transport) as c:
        yield c


def warm(c: Client, name: str, n: int = 12) -> None:
    rng = np.random.default_rng(0)
    X = np.hstack([rng.normal(size=(n, 2)), np.eye(3)[rng.integers(0, 3, size=n)]])
    c.update(name, X, X @ np.array([0.2, -0.1, 0.5, 0.4, 0.45]) + 0.3 * rng.normal(size=n))


def item(**extra: Any) -> dict[str, Any]:
    return {"actions": ACTIONS, "context": CONTEXT, **extra}


@pytest.mark.parametrize("kind", list(SPECS))
def test_a_seeded_item_is_decided_as_the_single_route_decides(client: Client, kind: str) -> None:
    client.create_model(spec(kind, "seeded"))
    warm(client, "seeded")
    cases = [("thompson", s) for s in range(6)] + [(s, 3) for s in ("greedy", "ucb", "epsilon")]
    items = [item(strategy=st, seed=seed, epsilon=0.3) for st, seed in cases]
    batch = client.decide_batch("seeded", items)
    assert len({d.event_id for d in batch}) == len(items)
    for d, body in zip(batch, items, strict=True):
        one = client.decide("seeded", ACTIONS, CONTEXT, body["strategy"], 0.3, seed=body["seed"])
        got = (d.action, d.scores, d.propensities, d.propensity_samples, d.version)
        assert got == (one.action, one.scores, one.propensities, one.propensity_samples, 12)
        assert d.propensity == d.propensities[d.action]
    assert client.get_model("seeded").version == 12  # deciding changes nothing


@pytest.mark.parametrize("kind", list(SPECS))
def test_unseeded_items_follow_thompson_sampling(client: Client, kind: str) -> None:
    client.create_model(spec(kind, "law"))
    warm(client, "law", n=6)
    draws = np.concatenate(
        [np.array(client.predict("law", PROBE, num_samples=1000, seed=s).samples) for s in range(4)]
    )[..., 0]
    truth = np.bincount(draws.argmax(axis=1), minlength=4) / len(draws)
    n = 600  # more than the 256 draws of a pool: the neural items span three pools
    batch = client.decide_batch("law", [item()] * n)
    share = np.bincount([d.action for d in batch], minlength=4) / n
    props = np.array([d.propensities for d in batch])
    for a in range(4):  # each decision an independent Thompson draw
        q = max(truth[a] * (1 - truth[a]), 1e-3)
        assert abs(share[a] - truth[a]) <= 5 * math.sqrt(q * (1 / n + 1 / 4000)), (share, truth)
        assert abs(props[:, a].mean() - truth[a]) <= 5 * math.sqrt(q * (1 / 256 + 1 / 4000))
    np.testing.assert_allclose(props.sum(axis=1), 1.0, atol=1e-12)
    assert all(d.propensity >= 1 / 256 and d.propensity_samples == 256 for d in batch)
    assert len({d.event_id for d in batch}) == n


def test_a_repeated_action_row_draws_alike_and_never_wins_a_tie(client: Client) -> None:
    client.create_model(spec("kalman", "ties"))
    warm(client, "ties", n=4)
    batch = client.decide_batch("ties", [item(actions=[*ACTIONS, ACTIONS[1]])] * 50)
    for d in batch:
        assert d.scores[4] == d.scores[1] and d.propensities[4] == 0.0 and d.action != 4


def test_events_retries_and_repeats(client: Client) -> None:
    client.create_model(spec("kalman", "events"))
    warm(client, "events")
    single = client.decide("events", ACTIONS, CONTEXT, event_id="one")
    items = [item(event_id="a"), item(), item(event_id="one"), item(event_id="a"), item()]
    first = client.decide_batch("events", items)
    assert first[2] == single  # an event that exists: its first answer
    assert first[3] == first[0] and first[0].event_id == "a"  # a repeat within the batch
    assert len({first[i].event_id for i in (0, 1, 2, 4)}) == 4
    again = client.decide_batch("events", [item(event_id="a", seed=5), item(event_id="one")])
    assert again == [first[0], single]  # a retried batch: the first answers, no new draw
    got = client.reward_batch("events", [(d.event_id, 1.0) for d in first[:3]])
    assert [r.version for r in got] == [13, 14, 15]


def _alike(a: BaseModel, b: BaseModel, *, exact: bool) -> None:
    """``a == b`` bit for bit where ``exact``; else the same fields and numbers to rounding: the
    Kalman filter takes a batch's rows in one block update, the same to rounding as the rows one
    at a time (``docs/algorithms.md`` 3.7)."""
    if exact:
        assert a == b
        return
    da, db = a.model_dump(), b.model_dump()
    assert _shape(da) == _shape(db)
    np.testing.assert_allclose(_numbers(da), _numbers(db), rtol=1e-10, atol=1e-12)


def _shape(v: object) -> object:
    """``v`` with every number replaced by its type: what must match exactly."""
    if isinstance(v, dict):
        return {k: _shape(u) for k, u in v.items()}
    if isinstance(v, list):
        return [_shape(u) for u in v]
    return type(v)


def _numbers(v: object) -> list[float]:
    if isinstance(v, dict):
        return [x for u in v.values() for x in _numbers(u)]
    if isinstance(v, list):
        return [x for u in v for x in _numbers(u)]
    return [float(v)] if isinstance(v, int | float) else []


def _decide_alike(c: Client, name: str, n: int) -> list[str]:
    items = [item(seed=s, strategy="thompson") for s in range(n)]
    return [d.event_id for d in c.decide_batch(name, items)]


@pytest.mark.parametrize("kind", list(SPECS))
def test_a_reward_batch_is_the_same_rewards_one_at_a_time(client: Client, kind: str) -> None:
    for name in ("batched", "single"):
        client.create_model(spec(kind, name, monitor=True))
        warm(client, name)
    rewards = [round(0.1 * k - 0.5, 2) for k in range(10)]
    batched, single = _decide_alike(client, "batched", 10), _decide_alike(client, "single", 10)
    got = client.reward_batch("batched", list(zip(batched, rewards, strict=True)))
    one = [client.reward("single", e, r) for e, r in zip(single, rewards, strict=True)]
    assert [r.version for r in got] == [r.version for r in one] == list(range(13, 23))
    assert all(r.applied and not r.duplicate for r in got)
    assert [r.event_id for r in got] == batched
    _alike(
        client.predict("batched", PROBE, num_samples=5, seed=1),
        client.predict("single", PROBE, num_samples=5, seed=1),
        exact=kind != "kalman",
    )
    cal_b, cal_s = client.calibration("batched"), client.calibration("single")
    assert cal_b.version == cal_s.version
    _alike(cal_b.summary, cal_s.summary, exact=kind != "kalman")
    retry = client.reward("batched", batched[4], 9.0)  # one event of the batch, posted again
    assert (retry.duplicate, retry.applied, retry.version) == (True, False, 17)


def test_duplicates_answer_duplicate_and_change_nothing(client: Client) -> None:
    client.create_model(spec("kalman", "dups"))
    warm(client, "dups")
    e = _decide_alike(client, "dups", 4)
    assert client.reward("dups", e[1], 0.3).version == 13
    got = client.reward_batch("dups", [(e[0], 1.0), (e[1], 5.0), (e[2], 2.0), (e[0], 7.0)])
    assert [(r.applied, r.duplicate, r.version) for r in got] == [
        (True, False, 14),
        (False, True, 13),  # rewarded before: its first answer
        (True, False, 15),
        (False, True, 14),  # earlier in this batch
    ]
    before = client.predict("dups", PROBE)
    again = client.reward_batch("dups", [(e[2], 0.0), (e[0], 0.0), (e[1], 0.0)])
    assert [(r.duplicate, r.version) for r in again] == [(True, 15), (True, 14), (True, 13)]
    assert client.get_model("dups").version == 15 and client.predict("dups", PROBE) == before
    twin = "dups-twin"
    client.create_model(spec("kalman", twin))
    warm(client, twin)
    t = _decide_alike(client, twin, 4)
    for k, r in ((1, 0.3), (0, 1.0), (2, 2.0)):
        client.reward(twin, t[k], r)
    _alike(client.predict(twin, PROBE), before, exact=False)


def _refused(c: Client, call: Any, status: int, *words: str) -> None:
    with pytest.raises(PostserveHTTPError) as err:
        call()
    assert err.value.status == status, err.value
    for w in words:
        assert w in err.value.message, err.value.message


def test_a_bad_item_refuses_the_whole_batch(app_client: MakeAppClient) -> None:
    h = app_client()
    with Client(str(h.base_url), transport=h.transport) as c:
        c.create_model(spec("kalman", "g"))
        c.create_model({**spec("kalman", "clicks"), "likelihood": {"type": "bernoulli"},
                        "filter": {"type": "ekf"}})  # fmt: skip
        e = _decide_alike(c, "g", 3)
        k = _decide_alike(c, "clicks", 2)
        _refused(c, lambda: c.reward_batch("g", [(e[0], 1.0), (e[1], 1.0), ("never", 1.0)]),
                 404, "item 2", "'never'", "unknown or expired", "nothing was applied")  # fmt: skip
        _refused(c, lambda: c.reward_batch("clicks", [(k[0], 1), (k[1], 0.5)]),
                 422, "item 1", "0 or 1", "nothing was applied")  # fmt: skip
        bad_width = [item(), item(), item(), item(actions=[[1.0, 0.0]])]
        _refused(c, lambda: c.decide_batch("g", bad_width), 422, "item 3", "action 0", "takes 5")
        assert c.get_model("g").version == c.get_model("clicks").version == 0
        raw = [
            ("decide", b'{"items": [{"actions": [[1, 0, 0]], "context": [0, NaN]}]}', "items.0."),
            ("reward", b'{"items": [{"event_id": "%s", "reward": 1}, {"event_id": "%s", '
             b'"reward": NaN}]}' % (e[0].encode(), e[1].encode()), "items.1.reward"),
            ("reward", b'{"items": []}', "items"),
            ("decide", b'{"items": [{"actions": [[1, 0, 0]], "stratgy": "x"}]}', "items.0.stratgy"),
        ]  # fmt: skip
        for route, body, words in raw:
            r = h.post(f"/v1/models/g/{route}/batch", content=body,
                       headers={"content-type": "application/json"})  # fmt: skip
            assert r.status_code == 422 and words in r.json()["error"]["message"], r.text
        assert c.get_model("g").version == 0
        ok = c.reward_batch("g", [(e[0], 1.0), (e[1], 1.0), (e[2], 1.0)])  # the events survived
        assert [r.version for r in ok] == [1, 2, 3]


def test_an_expired_event_refuses_the_whole_batch(client: Client) -> None:
    client.create_model(spec("kalman", "short", events={"ttl_s": 0.3}))
    old = _decide_alike(client, "short", 1)
    time.sleep(0.4)
    new = _decide_alike(client, "short", 1)
    _refused(client, lambda: client.reward_batch("short", [(new[0], 1.0), (old[0], 1.0)]),
             404, "item 1", old[0], "expired", "events.ttl_s")  # fmt: skip
    assert client.get_model("short").version == 0


def test_items_and_their_actions_count_against_the_row_limit(app_client: MakeAppClient) -> None:
    h = app_client(max_rows=10)
    with Client(str(h.base_url), transport=h.transport) as c:
        c.create_model(spec("kalman", "lim"))
        _refused(c, lambda: c.decide_batch("lim", [item()] * 3),
                 413, "12 rows", "the items' actions together", "10", "POSTSERVE_MAX_ROWS")  # fmt: skip
        events = [d.event_id for _ in range(6) for d in c.decide_batch("lim", [item()] * 2)]
        _refused(c, lambda: c.reward_batch("lim", [(e, 1.0) for e in events[:11]]),
                 413, "11 rows", "one per item", "POSTSERVE_MAX_ROWS")  # fmt: skip
        assert c.get_model("lim").version == 0
        assert [r.version for r in c.reward_batch("lim", [(e, 1.0) for e in events[:10]])][-1] == 10


def test_batches_end_to_end_through_a_crash(make_server: MakeServer) -> None:
    """A real server (sqlite): both clients; an acknowledged batch stays applied once."""
    server = make_server()

    async def loop(url: str) -> tuple[list[str], list[int]]:
        async with AsyncClient(url) as c:
            await c.create_model(spec("mlp", "e2e"))
            decided = await c.decide_batch("e2e", [item()] * 8)
            done = await c.reward_batch("e2e", [(d.event_id, 0.5) for d in decided])
            return [d.event_id for d in decided], [r.version for r in done]

    events, versions = asyncio.run(loop(server.url))
    assert versions == list(range(1, 9))
    with Client(server.url) as c:
        before = c.predict("e2e", PROBE)
    url = server.restart(crash=True)
    with Client(url) as c:
        again = c.reward_batch("e2e", [(e, 0.5) for e in reversed(events)])
        assert [(r.duplicate, r.version) for r in again] == [(True, v) for v in versions[::-1]]
        assert c.get_model("e2e").version == 8 and c.predict("e2e", PROBE) == before
        retried = c.decide_batch("e2e", [item(event_id=events[3])])
        assert retried[0].event_id == events[3] and retried[0].version == 0
