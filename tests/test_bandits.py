"""The decide/reward loop against a real server process, on the sqlite and the Redis store (bad
bodies: against the app in this process).

Independent truths: a reward must change the model exactly as ``/update`` with the event's
features does on a twin model; Thompson-sampling propensities must match the win frequencies of
posterior draws taken through ``/predict`` (whose samples share one theta across rows, so the
arg-max over rows of a sample is a Thompson decision); epsilon-greedy's are exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.client import Client, PostserveHTTPError
from service.testing import MakeAppClient, MakeServer, RedisServer, Server, linear_spec

CONTEXT = [0.5, -1.0]
ACTIONS = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]]


def spec(name: str, **extra: Any) -> dict[str, Any]:
    likelihood = {"type": "gaussian", "noise_variance": 0.5}
    return linear_spec(
        name, 5, bias=False, likelihood=likelihood, filter="kalman", dtype="float64", **extra
    )


@pytest.fixture(params=["sqlite", "redis"])
def server(
    request: pytest.FixtureRequest, make_server: MakeServer, tmp_path: Path
) -> Iterator[Server]:
    if request.param == "sqlite":
        yield make_server(env={"POSTSERVE_SNAPSHOT_INTERVAL_S": "0.5"})
        return
    redis = RedisServer(tmp_path / "redis").start()
    served = make_server(
        env={
            "POSTSERVE_STORE": "redis",
            "POSTSERVE_REDIS_URL": redis.url,
            "POSTSERVE_SNAPSHOT_INTERVAL_S": "0.5",
        },
        start=False,
    )
    try:
        served.start()
        yield served
    finally:
        served.stop()  # before Redis: its last snapshot goes to Redis
        redis.stop()


def warm(c: Client, name: str, n: int = 30, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    X = np.hstack([rng.normal(size=(n, 2)), np.eye(3)[rng.integers(0, 3, size=n)]])
    y = X @ np.array([0.2, -0.1, 0.5, 0.4, 0.45]) + 0.3 * rng.normal(size=n)
    c.update(name, X, y)


def test_decide_then_reward_is_one_update_with_the_chosen_features(server: Server) -> None:
    with Client(server.url) as c:
        c.create_model(spec("bandit"))
        c.create_model(spec("twin"))
        for name in ("bandit", "twin"):
            warm(c, name)
        d = c.decide("bandit", ACTIONS, context=CONTEXT, seed=3)
        assert d.version == 30 and 0 <= d.action < len(ACTIONS)
        assert len(d.scores) == len(ACTIONS) == len(d.propensities)
        assert d.propensity == d.propensities[d.action] >= 1 / d.propensity_samples
        assert d.propensity_samples == 256
        assert math.isclose(sum(d.propensities), 1.0, abs_tol=1e-12)
        assert c.get_model("bandit").version == 30  # deciding changes nothing
        r = c.reward("bandit", d.event_id, 1.25)
        assert (r.applied, r.duplicate, r.version) == (True, False, 31)
        c.update("twin", [CONTEXT + ACTIONS[d.action]], [1.25])
        probe = [CONTEXT + a for a in ACTIONS]
        assert c.predict("bandit", probe) == c.predict("twin", probe)
        again = c.reward("bandit", d.event_id, 1.25)  # says so, changes nothing
        assert (again.applied, again.duplicate, again.version) == (False, True, 31)
        other = c.reward("bandit", d.event_id, -7.0)
        assert other.duplicate and c.get_model("bandit").version == 31
        assert c.predict("bandit", probe) == c.predict("twin", probe)


def test_fixed_seed_same_decision_and_retry_same_event(server: Server) -> None:
    with Client(server.url) as c:
        c.create_model(spec("seeded"))
        warm(c, "seeded")
        a = c.decide("seeded", ACTIONS, context=CONTEXT, seed=11)
        b = c.decide("seeded", ACTIONS, context=CONTEXT, seed=11)
        assert a.event_id != b.event_id
        assert (a.action, a.scores, a.propensities) == (b.action, b.scores, b.propensities)
        actions = {c.decide("seeded", ACTIONS, context=CONTEXT, seed=s).action for s in range(40)}
        assert len(actions) > 1  # the seed matters: Thompson sampling explores
        first = c.decide("seeded", ACTIONS, context=CONTEXT, event_id="req-7", seed=1)
        retry = c.decide("seeded", ACTIONS, context=CONTEXT, event_id="req-7", seed=2)
        assert retry == first  # a retried decision is the first one, not a new draw


def test_propensities_of_each_strategy(server: Server) -> None:
    with Client(server.url) as c:
        c.create_model(spec("policies"))
        warm(c, "policies", n=12)
        probe = [CONTEXT + a for a in ACTIONS]
        pred = c.predict("policies", probe)
        mean = np.array(pred.mean)[:, 0]
        sd = np.sqrt(np.array(pred.epistemic_variance)[:, 0])
        greedy = c.decide("policies", ACTIONS, context=CONTEXT, strategy="greedy")
        assert greedy.action == int(np.argmax(mean)) and greedy.propensity_samples is None
        assert greedy.propensities == [float(a == greedy.action) for a in range(4)]
        np.testing.assert_allclose(greedy.scores, mean, rtol=1e-12)
        ucb = c.decide("policies", ACTIONS, context=CONTEXT, strategy="ucb")
        np.testing.assert_allclose(ucb.scores, mean + 2 * sd, rtol=1e-9)
        assert ucb.action == int(np.argmax(mean + 2 * sd)) and ucb.propensity == 1.0
        eps = c.decide("policies", ACTIONS, context=CONTEXT, strategy="epsilon", epsilon=0.2)
        want = [0.05 + 0.8 * (a == greedy.action) for a in range(4)]
        np.testing.assert_allclose(eps.propensities, want, rtol=1e-12)
        picks = [
            c.decide("policies", ACTIONS, context=CONTEXT, strategy="epsilon", epsilon=0.2, seed=s)
            for s in range(300)
        ]
        share = np.mean([p.action == greedy.action for p in picks])
        assert abs(share - 0.85) < 5 * math.sqrt(0.85 * 0.15 / 300)

        # Thompson: against arg-max frequencies of 4000 posterior draws through /predict.
        draws = np.concatenate(
            [
                np.array(c.predict("policies", probe, num_samples=1000, seed=s).samples)
                for s in range(4)
            ]
        )[..., 0]
        truth = np.bincount(draws.argmax(axis=1), minlength=4) / 4000
        ts = c.decide("policies", ACTIONS, context=CONTEXT, seed=9)
        for p, q in zip(ts.propensities, truth, strict=True):
            tolerance = 5 * math.sqrt(max(q * (1 - q), 1e-3) * (1 / 256 + 1 / 4000))
            assert abs(p - q) <= tolerance, (ts.propensities, truth)
        assert math.isclose(sum(ts.propensities), 1.0, abs_tol=1e-12)


def test_unknown_expired_and_default_rewards(server: Server) -> None:
    with Client(server.url) as c:
        c.create_model(spec("short", events={"ttl_s": 0.6}))
        c.create_model(spec("fallback", events={"ttl_s": 0.6, "default_reward": -1.0}))
        with pytest.raises(PostserveHTTPError) as unknown:
            c.reward("short", "never-made", 1.0)
        assert unknown.value.status == 404 and "never-made" in unknown.value.message
        gone = c.decide("short", ACTIONS, context=CONTEXT)
        kept = c.decide("fallback", ACTIONS, context=CONTEXT)
        time.sleep(0.8)
        with pytest.raises(PostserveHTTPError) as expired:
            c.reward("short", gone.event_id, 1.0)
        assert expired.value.status == 404
        assert gone.event_id in expired.value.message and "expired" in expired.value.message
        deadline = time.monotonic() + 10
        while c.get_model("fallback").version == 0:  # the default reward comes with a tick
            assert time.monotonic() < deadline, "the default reward was never applied"
            time.sleep(0.1)
        time.sleep(1.2)  # a few more ticks: applied once, not again
        assert c.get_model("fallback").version == 1
        assert c.get_model("short").version == 0  # no default: nothing applied
        c.create_model(spec("twin"))
        c.update("twin", [CONTEXT + ACTIONS[kept.action]], [-1.0])
        probe = [CONTEXT + a for a in ACTIONS]
        assert c.predict("fallback", probe).mean == c.predict("twin", probe).mean


def test_bad_decide_and_reward_bodies_change_nothing(app_client: MakeAppClient) -> None:
    h = app_client()
    with Client(str(h.base_url), transport=h.transport) as c:
        c.create_model(
            {**spec("clicks"), "likelihood": {"type": "bernoulli"}, "filter": {"type": "ekf"}}
        )
        d = c.decide("clicks", ACTIONS, context=CONTEXT)
        cases = [
            ("decide", {"actions": [[1.0, 0.0]], "context": CONTEXT}, "takes 5"),
            ("decide", {"actions": [], "context": CONTEXT}, "actions"),
            ("decide", {"actions": ACTIONS, "context": CONTEXT, "strategy": "best"}, "strategy"),
            ("decide", {"actions": ACTIONS, "context": CONTEXT, "epsilon": 1.5}, "epsilon"),
            ("decide", {"actions": ACTIONS, "context": CONTEXT, "event_id": "a b"}, "event_id"),
            ("reward", {"event_id": d.event_id, "reward": 0.5}, "0 or 1"),
            ("reward", {"event_id": d.event_id}, "reward"),
            ("reward", {"event_id": d.event_id, "reward": "1"}, "reward"),
        ]
        for route, body, words in cases:
            r = h.post(f"/v1/models/clicks/{route}", json=body)
            assert r.status_code == 422, (body, r.text)
            assert words in r.json()["error"]["message"], (body, r.text)
        nan = h.post(
            "/v1/models/clicks/decide",
            content=b'{"actions": [[NaN, 0, 0]], "context": [0, 0]}',
            headers={"content-type": "application/json"},
        )
        assert nan.status_code == 422
        assert c.get_model("clicks").version == 0
        ok = c.reward("clicks", d.event_id, 1)  # the event survived the bad reward
        assert ok.applied and ok.version == 1
        odd = {
            **spec("odd"),
            "likelihood": {"type": "bernoulli"},
            "filter": {"type": "ekf"},
            "events": {"default_reward": 0.5},
        }
        r = h.post("/v1/models", json=odd)
        assert r.status_code == 422 and "default_reward" in r.json()["error"]["message"], r.text
        assert h.get("/v1/models/odd").status_code == 404
        wide = {**spec("wide"), "network": {"type": "linear", "input_dim": 5, "output_dim": 2}}
        c.create_model(wide)
        with pytest.raises(PostserveHTTPError) as two:
            c.decide("wide", ACTIONS, context=CONTEXT)
        assert two.value.status == 422 and "one output" in two.value.message


def test_an_acknowledged_reward_stays_applied_once_across_a_crash(make_server: MakeServer) -> None:
    server = make_server()
    with Client(server.url) as c:
        c.create_model(spec("durable"))
        d = c.decide("durable", ACTIONS, context=CONTEXT)
        assert c.reward("durable", d.event_id, 0.7).version == 1
    url = server.restart(crash=True)
    with Client(url) as c:
        again = c.reward("durable", d.event_id, 0.7)
        assert again.duplicate and not again.applied and again.version == 1
        assert c.get_model("durable").version == 1


def test_readme_bandit_block_runs(make_server: MakeServer) -> None:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Bandits: decide, then reward\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2  # actions as rows, then arms as outputs
    server = make_server()
    for run in (1, 2):  # a second run finds the models and decides again
        namespace: dict[str, Any] = {}
        for code, model in zip(blocks, ("home-feed", "catalogue"), strict=True):
            exec(
                compile(code.replace("http://127.0.0.1:8000", server.url), "README.md", "exec"),
                namespace,
            )
            d = namespace["d"]
            assert 0 <= d.action < 3 and math.isclose(sum(d.propensities), 1.0, abs_tol=1e-12)
            with Client(server.url) as c:
                assert c.get_model(model).version == run
                assert c.reward(model, d.event_id, 1).duplicate


def test_example_bandit_loop_runs(make_server: MakeServer) -> None:
    import subprocess
    import sys

    server = make_server()
    example = Path(__file__).resolve().parents[1] / "examples" / "bandit_loop.py"
    done = subprocess.run(
        [sys.executable, str(example), "--url", server.url, "--rounds", "500"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "round 500: click rate" in done.stdout
    with Client(server.url) as c:
        assert c.get_model("banners").version == 500  # every reward applied once
