"""Arms as outputs: ``/decide`` with a context alone on a model with one output per arm, and its
``/reward`` observing the chosen output alone, against a real server process (sqlite).

Independent truths: a reward must change the model exactly as ``/update`` with ``outputs`` (the
chosen arm) does on a twin model (a batch of rewards, a block update of the Kalman filter: to
rounding), and conditioning on one output must leave the other outputs'
parameters where they were (a linear model with an isotropic prior: each output has its own);
Thompson propensities must match the arg-max frequencies of posterior draws taken through
``/predict`` (whose samples of one row are one theta's C outputs); a model restarted after a
crash must answer as before it (its log replayed, ``outputs`` included).
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import numpy as np
import pytest

from service.client import Client, PostserveHTTPError
from service.testing import MakeServer, Server, linear_spec, mlp_spec

K = 4
CONTEXT = [0.5, -1.0, 0.25]
PROBE = [CONTEXT, [1.0, 0.0, -0.5]]


def spec(name: str, **extra: Any) -> dict[str, Any]:
    likelihood = {"type": "gaussian", "noise_variance": 0.5}
    return linear_spec(name, 3, K, likelihood=likelihood, filter="kalman", dtype="float64", **extra)


def warm(c: Client, name: str, n: int = 24, seed: int = 0) -> None:
    """n rows, each observing one arm's reward."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    arms = rng.integers(0, K, size=n)
    W = np.array([[0.2, -0.1, 0.5], [0.4, 0.3, -0.2], [-0.3, 0.1, 0.1], [0.0, 0.5, 0.2]])
    y = np.einsum("ni,ni->n", X, W[arms]) + 0.3 * rng.normal(size=n)
    c.update(name, X, y, outputs=arms)


@pytest.fixture
def server(make_server: MakeServer) -> Server:
    return make_server()


def test_a_reward_is_the_update_of_the_chosen_output_alone(server: Server) -> None:
    with Client(server.url) as c:
        for name in ("bandit", "twin"):
            c.create_model(spec(name))
            warm(c, name)
        before = c.predict("bandit", PROBE)
        d = c.decide("bandit", context=CONTEXT, seed=3)
        assert 0 <= d.action < K and len(d.scores) == K == len(d.propensities)
        assert math.isclose(sum(d.propensities), 1.0, abs_tol=1e-12)
        assert c.get_model("bandit").version == 24  # deciding changes nothing
        r = c.reward("bandit", d.event_id, 1.25)
        assert (r.applied, r.duplicate, r.version) == (True, False, 25)
        u = c.update("twin", [CONTEXT], [1.25], outputs=[d.action])
        assert u.version == 25 and len(u.predictions[0].mean) == 1
        after, twin = c.predict("bandit", PROBE), c.predict("twin", PROBE)
        assert after == twin  # bit for bit: the same step
        for k in range(K):  # only the chosen arm's predictions move
            moved = [after.mean[i][k] != before.mean[i][k] for i in range(len(PROBE))]
            assert all(moved) if k == d.action else not any(moved), (k, d.action)


def test_propensities_match_the_argmax_frequencies_of_posterior_draws(server: Server) -> None:
    with Client(server.url) as c:
        c.create_model(spec("ts"))
        warm(c, "ts", n=10)
        draws = np.concatenate(
            [
                np.array(c.predict("ts", [CONTEXT], num_samples=1000, seed=s).samples)[:, 0]
                for s in range(4)
            ]
        )  # (4000, K): one theta's K outputs per draw
        truth = np.bincount(draws.argmax(axis=1), minlength=K) / len(draws)
        ts = c.decide("ts", context=CONTEXT, seed=9)
        for p, q in zip(ts.propensities, truth, strict=True):
            tolerance = 5 * math.sqrt(max(q * (1 - q), 1e-3) * (1 / 256 + 1 / 4000))
            assert abs(p - q) <= tolerance, (ts.propensities, truth)
        greedy = c.decide("ts", context=CONTEXT, strategy="greedy")
        mean = c.predict("ts", [CONTEXT]).mean[0]
        assert greedy.action == int(np.argmax(mean)) and greedy.scores == mean


def test_batches_of_arms_are_the_rewards_one_at_a_time(server: Server) -> None:
    with Client(server.url) as c:
        for name in ("batched", "single"):
            c.create_model(spec(name))
            warm(c, name, n=8)
        contexts = [[0.1 * i, -0.2, 0.3 * (i % 3)] for i in range(6)]
        decided = c.decide_batch("batched", [{"context": x} for x in contexts])
        rewards = [0.5 - 0.1 * i for i in range(6)]
        pairs = [(d.event_id, r) for d, r in zip(decided, rewards, strict=True)]
        done = c.reward_batch("batched", pairs)
        assert [r.version for r in done] == list(range(9, 15))
        for x, d, r in zip(contexts, decided, rewards, strict=True):
            c.update("single", [x], [r], outputs=[d.action])
        batched, single = c.predict("batched", PROBE), c.predict("single", PROBE)
        # the batch's rows are one Kalman block update: the same to rounding (algorithms 3.7)
        np.testing.assert_allclose(batched.mean, single.mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(batched.variance, single.variance, rtol=1e-10, atol=1e-12)


def test_bad_outputs_are_refused_by_name_and_change_nothing(server: Server) -> None:
    with Client(server.url) as c:
        c.create_model(spec("strict"))
        warm(c, "strict", n=4)
        before = c.predict("strict", PROBE)
        bad: list[tuple[dict[str, Any], str]] = [
            ({"outputs": [K]}, f"outputs[0] = {K} is not an output"),
            ({"outputs": [-1]}, "outputs.0"),
            ({"outputs": [0, 1]}, "outputs has 2 entries but x has 1 rows"),
            ({"outputs": [0], "y": [[1.0, 2.0]]}, "one number per row"),
        ]
        for change, message in bad:
            body = {"x": [CONTEXT], "y": [1.0], **change}
            r = httpx.post(f"{server.url}/v1/models/strict/update", json=body)
            assert r.status_code == 422 and message in r.text, (change, r.text)
        with pytest.raises(PostserveHTTPError) as wide:
            c.decide("strict", [[1.0], [2.0]], context=[0.0, 0.0])
        assert wide.value.status == 422 and "context alone" in wide.value.message
        with pytest.raises(PostserveHTTPError) as short:
            c.decide("strict", context=[0.0, 1.0])
        assert short.value.status == 422 and "the context has 2 values" in short.value.message
        assert c.get_model("strict").version == 4 and c.predict("strict", PROBE) == before


def test_a_crash_replays_partial_observations_exactly(make_server: MakeServer) -> None:
    server = make_server(env={"POSTSERVE_SNAPSHOT_INTERVAL_S": "3600"})
    with Client(server.url) as c:
        c.create_model(spec("durable"))
        c.create_model(mlp_spec("neural", 3, [8], K, dtype="float64"))  # linearised draws
        for name in ("durable", "neural"):
            warm(c, name, n=6)
            d = c.decide(name, context=CONTEXT)
            c.reward(name, d.event_id, 0.75)
        before = {name: c.predict(name, PROBE) for name in ("durable", "neural")}
    url = server.restart(crash=True)
    with Client(url) as c:
        for name, answer in before.items():
            assert c.get_model(name).version == 7 and c.predict(name, PROBE) == answer
