"""Postserve on Redis, end to end: crashes of the server and of Redis, two replicas, an outage.

Real processes throughout: ``redis-server`` with AOF (appendfsync always) and Postserve servers
(service/testing.py). Bounded in time; randomness is seeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync

from service.errors import NotOwner, StoreUnavailable
from service.store import RedisStore
from service.testing import RedisServer, Server
from service.testing.load import LOAD_SPEC, check_acknowledged_survived, updates_until_killed

SPEC = {
    "network": {"type": "linear", "input_dim": 3, "output_dim": 1},
    "likelihood": {"type": "gaussian", "noise_variance": 0.5},
    "filter": {"type": "kalman"},
    "dtype": "float64",
}
PROBE = {"x": [[0.3, -1.0, 2.0], [1.0, 0.5, -0.2]], "num_samples": 3, "seed": 11}


def _row(i: int) -> tuple[list[float], float]:
    rng = random.Random(i)
    x = [round(rng.uniform(-2, 2), 6) for _ in range(3)]
    return x, round(0.5 * x[0] - x[1] + 0.25 * x[2] + rng.gauss(0, 0.5), 6)


def _env(redis: RedisServer, **extra: str) -> dict[str, str]:
    return {
        "POSTSERVE_STORE": "redis",
        "POSTSERVE_REDIS_URL": redis.url,
        "POSTSERVE_REDIS_TIMEOUT_S": "0.5",
        "POSTSERVE_SNAPSHOT_EVERY": "25",
        **extra,
    }


def _post(url: str, path: str, body: dict[str, Any], timeout: float = 5.0) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=timeout) as c:
        return c.post(path, json=body)


def _send_until_acked(server: Server, i: int, deadline: float) -> dict[str, Any]:
    """Post update i (request_id u{i}) until it is acknowledged, across restarts and outages."""
    x, y = _row(i)
    body = {"x": [x], "y": [y], "request_id": f"u{i}"}
    while time.monotonic() < deadline:
        try:
            r = _post(server.url, "/v1/models/m/update", body)
        except (httpx.HTTPError, AssertionError):
            time.sleep(0.05)
            continue
        if r.status_code == 200:
            return dict(r.json())
        assert r.status_code in (409, 503), r.text  # not the owner yet / store down: retry
        time.sleep(0.05)
    raise AssertionError(f"update {i} was never acknowledged")


def _logged_request_ids(redis_url: str, name: str) -> list[str]:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        entries = client.xrange(f"postserve:log:{name}")
        snap = client.hget(f"postserve:snap:{name}", "version")
    finally:
        client.close()
    ids = [json.loads(fields[b"r"])["request_id"] for _, fields in entries]
    return ids if snap is None else [f"snapshot<= {int(snap)}", *ids]


def _check_against_fresh_replay(server: Server, n: int) -> None:
    """The model equals a fresh model fed the acknowledged observations in order, bit for bit."""
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.post("/v1/models", json={"name": "fresh", **SPEC}).status_code == 201
        for i in range(n):
            x, y = _row(i)
            assert c.post("/v1/models/fresh/update", json={"x": [x], "y": [y]}).status_code == 200
        ours = c.post("/v1/models/m/predict", json=PROBE).json()
        fresh = c.post("/v1/models/fresh/predict", json=PROBE).json()
    assert ours["version"] == fresh["version"] == n
    assert ours == fresh


def test_sigkill_at_random_moments_loses_nothing_and_applies_nothing_twice(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    server = Server(tmp_path / "pa", _env(redis, POSTSERVE_REPLICA_ID="replica-a"))
    n, rng, deadline = 90, random.Random(7), time.monotonic() + 150
    kills = sorted(rng.sample(range(5, n - 5), 6))
    duplicates = 0
    try:
        server.start()
        assert _post(server.url, "/v1/models", {"name": "m", **SPEC}).status_code == 201
        for i in range(n):
            if i in kills:
                # Kill the server while update i is in flight, at a random moment.
                x, y = _row(i)
                body = {"x": [x], "y": [y], "request_id": f"u{i}"}
                url = server.url
                t = threading.Thread(
                    target=_safe_post, args=(url, "/v1/models/m/update", body), daemon=True
                )
                t.start()
                time.sleep(rng.uniform(0.0, 0.02))
                server.kill()
                t.join(10)
                server.start()
                # The update acknowledged just before the crash is recognised as a repeat.
                again = _send_until_acked(server, i - 1, deadline)
                assert again["duplicate"] and again["version"] == i
            answer = _send_until_acked(server, i, deadline)
            assert answer["version"] == i + 1
            duplicates += bool(answer["duplicate"])  # applied before the kill, answered after
        with httpx.Client(base_url=server.url) as c:
            assert c.get("/v1/models/m").json()["version"] == n
        logged = [r for r in _logged_request_ids(redis.url, "m") if not r.startswith("snapshot")]
        assert len(logged) == len(set(logged)), "a request_id was applied twice"
        assert logged == [f"u{i}" for i in range(n - len(logged), n)]  # the tail after a snapshot
        _check_against_fresh_replay(server, n)
    finally:
        server.stop()
        redis.stop()
    print(f"kills before updates {kills}; {duplicates} retries answered as duplicates")


def test_sigkill_of_server_and_redis_under_concurrent_updates_keeps_every_acknowledged_one(
    tmp_path: Path,
) -> None:
    """16 clients update one model (their appends share pipelines) until the server is SIGKILLed
    mid-stream; then redis-server is SIGKILLed too and restarted from its AOF."""
    redis = RedisServer(tmp_path / "redis").start()
    env = _env(redis, POSTSERVE_SNAPSHOT_EVERY="1000000", POSTSERVE_SNAPSHOT_INTERVAL_S="3600")
    server = Server(tmp_path / "pa", {**env, "POSTSERVE_REPLICA_ID": "replica-a"})
    try:
        server.start()
        assert _post(server.url, "/v1/models", LOAD_SPEC).status_code == 201
        acked = updates_until_killed(server, "load", 3, clients=16, acks=150)
        assert len(acked) >= 150
        redis.kill()
        redis.start()
        client = redis_sync.Redis.from_url(redis.url)
        try:
            entries = client.xrange("postserve:log:load")
        finally:
            client.close()
        logged = [(int(i.split(b"-")[0]), json.loads(f[b"r"])) for i, f in entries]
        check_acknowledged_survived(server, acked, logged)
    finally:
        server.stop()
        redis.stop()


def _safe_post(url: str, path: str, body: dict[str, Any]) -> None:
    with contextlib.suppress(httpx.HTTPError):
        _post(url, path, body)


def test_redis_killed_and_restarted_with_aof_keeps_every_acknowledged_update(
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    server = Server(tmp_path / "pa", _env(redis))
    n, rng, deadline = 60, random.Random(8), time.monotonic() + 120
    kills = sorted(rng.sample(range(5, n - 5), 3))
    try:
        server.start()
        assert _post(server.url, "/v1/models", {"name": "m", **SPEC}).status_code == 201
        for i in range(n):
            if i in kills:
                redis.kill()
                x, y = _row(i)
                r = _post(server.url, "/v1/models/m/update", {"x": [x], "y": [y]})
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable"
                redis.start()
            answer = _send_until_acked(server, i, deadline)
            assert answer["version"] == i + 1
        # Restart the server too: everything comes back from Redis alone.
        server.restart(crash=True)
        logged = [r for r in _logged_request_ids(redis.url, "m") if not r.startswith("snapshot")]
        assert len(logged) == len(set(logged))
        _check_against_fresh_replay(server, n)
    finally:
        server.stop()
        redis.stop()


def test_two_replicas_one_writer_and_takeover_within_the_lease(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    lease_ms = 1500
    env = _env(redis, POSTSERVE_REDIS_LEASE_MS=str(lease_ms))
    a, b = Server(tmp_path / "a", env), Server(tmp_path / "b", env)
    try:
        a.start()
        assert _post(a.url, "/v1/models", {"name": "m", **SPEC}).status_code == 201
        b.start()  # restores the catalogue from Redis
        for i in range(10):
            x, y = _row(i)
            assert _post(a.url, "/v1/models/m/update", {"x": [x], "y": [y]}).status_code == 200
            r = _post(b.url, "/v1/models/m/update", {"x": [x], "y": [y]})
            assert r.status_code == 409, r.text
            assert r.json()["error"]["code"] == "not_owner"
        assert _post(b.url, "/v1/models/m/predict", PROBE).status_code == 200  # reads anywhere
        a.kill()
        killed = time.monotonic()
        x, y = _row(10)
        while True:
            r = _post(b.url, "/v1/models/m/update", {"x": [x], "y": [y]})
            if r.status_code == 200:
                break
            assert r.status_code == 409, r.text
            assert time.monotonic() - killed < lease_ms / 1000 + 2.0, "no takeover in time"
            time.sleep(0.05)
        took = time.monotonic() - killed
        assert r.json()["version"] == 11  # continued from a's latest state
        for i in range(11, 20):
            x, y = _row(i)
            assert _post(b.url, "/v1/models/m/update", {"x": [x], "y": [y]}).status_code == 200
        _check_against_fresh_replay(b, 20)
    finally:
        a.stop()
        b.stop()
        redis.stop()
    assert took <= lease_ms / 1000 + 2.0
    print(f"takeover {took:.2f} s after the owner died (lease {lease_ms} ms)")


def test_an_idle_lease_is_released_so_the_model_can_move(tmp_path: Path) -> None:
    """After the traffic for a model moves to another replica (an ingress rehash), the old owner
    lets the lease go once idle, and the new replica continues from the latest state."""
    redis = RedisServer(tmp_path / "redis").start()
    lease_ms, idle_s = 900, 1.2
    env = _env(
        redis,
        POSTSERVE_REDIS_LEASE_MS=str(lease_ms),
        POSTSERVE_REDIS_LEASE_IDLE_S=str(idle_s),
        POSTSERVE_SNAPSHOT_INTERVAL_S="0.5",
    )
    a, b = Server(tmp_path / "a", env), Server(tmp_path / "b", env)
    try:
        a.start()
        assert _post(a.url, "/v1/models", {"name": "m", **SPEC}).status_code == 201
        b.start()
        for i in range(5):
            x, y = _row(i)
            assert _post(a.url, "/v1/models/m/update", {"x": [x], "y": [y]}).status_code == 200
        moved = time.monotonic()
        x, y = _row(5)
        while True:  # the traffic now goes to b only
            r = _post(b.url, "/v1/models/m/update", {"x": [x], "y": [y]})
            if r.status_code == 200:
                break
            assert r.status_code == 409 and r.json()["error"]["code"] == "not_owner", r.text
            assert time.monotonic() - moved < idle_s + lease_ms / 1000 + 3.0, "never released"
            time.sleep(0.05)
        took = time.monotonic() - moved
        assert r.json()["version"] == 6
        assert took >= idle_s - 0.2  # a held it while it might still write
        r = _post(a.url, "/v1/models/m/update", {"x": [x], "y": [y]})
        assert r.status_code == 409, r.text  # and now b is the one writer
        assert "released the idle lease of m" in a.log_text()
        _check_against_fresh_replay(b, 6)
    finally:
        a.stop()
        b.stop()
        redis.stop()
    print(f"moved after {took:.2f} s (idle {idle_s} s, lease {lease_ms} ms)")


def test_redis_down_updates_503_predictions_200_then_recovers(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    server = Server(tmp_path / "pa", _env(redis))
    try:
        server.start()
        with httpx.Client(base_url=server.url, timeout=5) as c:
            assert c.post("/v1/models", json={"name": "m", **SPEC}).status_code == 201
            x, y = _row(0)
            assert c.post("/v1/models/m/update", json={"x": [x], "y": [y]}).status_code == 200
            before = c.post("/v1/models/m/predict", json=PROBE).json()
            redis.kill()
            for i in range(1, 4):
                x, y = _row(i)
                r = c.post("/v1/models/m/update", json={"x": [x], "y": [y], "request_id": "k"})
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable"
                assert c.get("/v1/models/m").json()["version"] == 1
                assert c.post("/v1/models/m/predict", json=PROBE).json() == before
            assert c.get("/readyz").status_code == 503
            redis.start()
            deadline = time.monotonic() + 20
            while True:
                r = c.post("/v1/models/m/update", json={"x": [x], "y": [y], "request_id": "k"})
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert r.status_code == 200, r.text
            assert r.json()["version"] == 2
            assert c.get("/readyz").status_code == 200
    finally:
        server.stop()
        redis.stop()


def test_a_replica_that_lost_its_lease_cannot_write(tmp_path: Path) -> None:
    """Fencing at the store: a paused owner whose lease lapsed is refused by the Lua check."""
    redis = RedisServer(tmp_path / "redis").start()

    async def main() -> None:
        a = RedisStore(redis.url, lease_ms=300, replica="a")
        b = RedisStore(redis.url, lease_ms=300, replica="b")
        await a.open()
        await b.open()
        try:
            await a.create_model("m", b"{}")
            assert await a.lease.acquire("m")
            await a.append("m", 1, b"one")
            with pytest.raises(NotOwner):
                await b.lease.acquire("m")
            assert a.lease._renewer is not None
            a.lease._renewer.cancel()  # a stalls: no more renewals
            await asyncio.sleep(0.5)
            assert await b.lease.acquire("m")
            await b.append("m", 2, b"two")
            with pytest.raises(NotOwner):
                await a.append("m", 3, b"stale writer")  # a still thinks it holds the lease
            assert [r.record for r in await b.read_log("m")] == [b"one", b"two"]
        finally:
            await a.close()
            await b.close()

    try:
        asyncio.run(main())
    finally:
        redis.stop()


def test_server_started_before_redis_becomes_ready_when_redis_comes(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", password="s3cret")  # not started yet
    server = Server(tmp_path / "pa", _env(redis))
    starter = threading.Thread(target=server.start, daemon=True)  # returns once /readyz is 200
    try:
        starter.start()
        deadline = time.monotonic() + 20
        while True:  # the process answers, but is not ready without Redis
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"http://127.0.0.1:{server.port}/readyz", timeout=1)
                if r.status_code == 503:
                    break
            assert time.monotonic() < deadline, "the server never answered /readyz"
            time.sleep(0.2)
        assert r.json()["ready"] is False
        redis.start()
        starter.join(30)
        assert not starter.is_alive()
        assert _post(server.url, "/v1/models", {"name": "m", **SPEC}).status_code == 201
        x, y = _row(0)
        assert _post(server.url, "/v1/models/m/update", {"x": [x], "y": [y]}).status_code == 200
    finally:
        starter.join(30)
        server.stop()
        redis.stop()


def test_password_urls_work_and_a_wrong_password_is_unavailable(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", password="s3cret").start()

    async def main() -> None:
        good = RedisStore(redis.url)
        bad = RedisStore(redis.url.replace("s3cret", "wrong"))
        await good.open()
        await bad.open()
        try:
            assert await good.ping()
            assert await good.create_model("m", b"{}")
            assert not await bad.ping()
            with pytest.raises(StoreUnavailable):
                await bad.list_models()
        finally:
            await good.close()
            await bad.close()

    try:
        asyncio.run(main())
    finally:
        redis.stop()


@contextlib.contextmanager
def _created_after_both_started(
    tmp_path: Path, **env: str
) -> Iterator[tuple[Server, Server, RedisServer]]:
    """Replicas a and b on one Redis, then model m created on a (b has not restored it)."""
    redis = RedisServer(tmp_path / "redis").start()
    a, b = Server(tmp_path / "a", _env(redis, **env)), Server(tmp_path / "b", _env(redis, **env))
    try:
        a.start()
        b.start()
        assert _post(a.url, "/v1/models", {"name": "m", **SPEC}).status_code == 201
        yield a, b, redis
    finally:
        a.stop()
        b.stop()
        redis.stop()


def test_a_model_another_replica_created_later_is_hosted_on_first_use(tmp_path: Path) -> None:
    """b started before the model existed: its first request for it finds the model in Redis and
    hosts it at the latest state (snapshot + stream); unknown names stay 404."""
    settings = {"POSTSERVE_REDIS_LEASE_MS": "1000", "POSTSERVE_SNAPSHOT_EVERY": "3"}
    with _created_after_both_started(tmp_path, **settings) as (a, b, _):
        for i in range(5):  # a snapshot at 3, then two records in the stream
            x, y = _row(i)
            assert _post(a.url, "/v1/models/m/update", {"x": [x], "y": [y]}).status_code == 200
        want = _post(a.url, "/v1/models/m/predict", PROBE).json()
        got = _post(b.url, "/v1/models/m/predict", PROBE)
        assert got.status_code == 200, got.text
        assert got.json() == want and want["version"] == 5
        assert "hosting m (created by another replica) at version 5" in b.log_text()
        with httpx.Client(base_url=b.url, timeout=5) as c:
            assert c.get("/v1/models/m").json()["version"] == 5
            assert c.get("/v1/models/nope").status_code == 404
            assert _post(b.url, "/v1/models/nope/predict", PROBE).status_code == 404
        r = _post(b.url, "/v1/models", {"name": "m", **SPEC})
        assert r.status_code == 409 and r.json()["error"]["code"] == "already_exists", r.text
        a.kill()
        x, y = _row(5)
        deadline = time.monotonic() + 10
        while (r := _post(b.url, "/v1/models/m/update", {"x": [x], "y": [y]})).status_code == 409:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        assert r.status_code == 200 and r.json()["version"] == 6, r.text
        _check_against_fresh_replay(b, 6)


def test_a_model_deleted_on_one_replica_is_not_written_again_by_another(tmp_path: Path) -> None:
    settings = {"POSTSERVE_REDIS_LEASE_MS": "600", "POSTSERVE_REDIS_LEASE_IDLE_S": "0.5"}
    with _created_after_both_started(tmp_path, **settings) as (a, b, redis):
        x, y = _row(0)
        assert _post(b.url, "/v1/models/m/update", {"x": [x], "y": [y]}).status_code == 200
        time.sleep(1.5)  # b's idle lease is released
        with httpx.Client(base_url=a.url, timeout=5) as c:
            assert c.delete("/v1/models/m").status_code == 204
        assert _post(b.url, "/v1/models/m/predict", PROBE).status_code == 200  # still hosted
        r = _post(b.url, "/v1/models/m/update", {"x": [x], "y": [y]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
        assert _post(b.url, "/v1/models/m/predict", PROBE).status_code == 404  # dropped
        assert "m was deleted by another replica" in b.log_text()
        keys = redis_sync.Redis.from_url(redis.url).keys("*")
        assert not [k for k in keys if b":log:m" in k or b":snap:m" in k], keys
