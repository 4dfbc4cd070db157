"""Concurrent ``/update`` load on a real server until it is killed, for the crash tests.

:func:`updates_until_killed` runs ``clients`` concurrent clients, each posting one-row updates of
one model (:data:`LOAD_SPEC`), every one with its own ``request_id``, and SIGKILLs the server once
``acks`` of them have been acknowledged, while the others are in flight. It returns what was
acknowledged; :func:`check_acknowledged_survived` then checks it against the log read back from
the store, and restarts the server to check what it hosts. The durable stores commit the updates
in flight together (group commit), and none may be answered before its commit.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import httpx

from service.testing.servers import Server
from service.testing.specs import JSONObject, linear_spec

__all__ = ["LOAD_SPEC", "Acked", "check_acknowledged_survived", "row", "updates_until_killed"]

#: the model the load updates: 3 inputs, the exact Kalman filter in float64 (bit-exact replays)
LOAD_SPEC = linear_spec("load", 3, filter="kalman", dtype="float64")
_PROBE = {"x": [[0.3, -1.0, 2.0], [1.0, 0.5, -0.2]], "num_samples": 3, "seed": 11}


@dataclass(frozen=True)
class Acked:
    """One acknowledged update: its row and the model version it answered."""

    x: list[float]
    y: float
    version: int


def row(request_id: str, dim: int) -> tuple[list[float], float]:
    """The deterministic row posted with ``request_id``."""
    rng = random.Random(request_id)
    x = [round(rng.uniform(-2, 2), 6) for _ in range(dim)]
    return x, round(sum(x) / dim + rng.gauss(0, 0.5), 6)


def updates_until_killed(
    server: Server, name: str, dim: int, clients: int = 16, acks: int = 150
) -> dict[str, Acked]:
    """Post updates of ``name`` (``dim`` inputs) from ``clients`` clients until ``acks`` are
    acknowledged, then SIGKILL ``server`` mid-stream; request_id -> what was acknowledged."""
    acked: dict[str, Acked] = {}
    killed = asyncio.Event()

    async def client(k: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            i = 0
            while not killed.is_set():
                rid = f"c{k}-{i}"
                x, y = row(rid, dim)
                body = {"x": [x], "y": [y], "request_id": rid}
                try:
                    r = await c.post(f"/v1/models/{name}/update", json=body)
                except httpx.HTTPError:
                    return  # the server is gone
                if killed.is_set():
                    return  # answered as it died: not counted either way
                assert r.status_code == 200, r.text
                acked[rid] = Acked(x, y, int(r.json()["version"]))
                if len(acked) >= acks:
                    server.kill()
                    killed.set()
                i += 1

    async def main() -> None:
        await asyncio.gather(*(client(k) for k in range(clients)))

    asyncio.run(main())
    return acked


def check_acknowledged_survived(
    server: Server, acked: dict[str, Acked], logged: list[tuple[int, JSONObject]]
) -> None:
    """After a crash under :func:`updates_until_killed` (``logged``: the model's log read back
    from the store, in version order, each record's JSON): the log has no gap and holds every
    acknowledged update at the version it answered; the restarted ``server`` hosts exactly the
    log's state (a fresh model fed the log answers the same, bit for bit) and answers a retried
    acknowledged ``request_id`` as a duplicate. Raises AssertionError otherwise."""
    versions = [v for v, _ in logged]
    assert versions == list(range(1, len(logged) + 1)), f"the log has a gap: {versions}"
    at = {rec["request_id"]: (v, rec) for v, rec in logged}
    for rid, a in acked.items():
        assert rid in at, f"acknowledged update {rid} (version {a.version}) was lost"
        version, rec = at[rid]
        assert (version, rec["x"], rec["y"]) == (a.version, [a.x], [a.y]), rid
    server.start()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/v1/models/load").json()["version"] == len(logged)
        for rid, a in sorted(acked.items())[:10]:
            r = c.post("/v1/models/load/update", json={"x": [a.x], "y": [a.y], "request_id": rid})
            assert r.status_code == 200 and r.json()["duplicate"] is True, r.text
            assert r.json()["version"] == a.version
        assert c.post("/v1/models", json={**LOAD_SPEC, "name": "fresh"}).status_code == 201
        for _, rec in logged:
            r = c.post("/v1/models/fresh/update", json={"x": rec["x"], "y": rec["y"]})
            assert r.status_code == 200, r.text
        ours = c.post("/v1/models/load/predict", json=_PROBE).json()
        replayed = c.post("/v1/models/fresh/predict", json=_PROBE).json()
        assert ours == replayed, "the restored state is not the log's"
