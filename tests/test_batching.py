"""Cross-model batching (service/filters/batched.py, service/hosting/batching.py).

The batched step of N models against each model's own step: bit for bit whatever the batch's
size and a model's place in it, and against the eager step and a NumPy Kalman filter to
rounding. Through the engine: concurrent updates of many models are stepped together and each
model ends bit for bit where it ends when stepped alone; bad rows in a batch are refused alone;
a restart replays the batched records to the same bits, with the setting on or off. Through a
real server: concurrent HTTP updates with ``POSTSERVE_BATCH_STEPS`` on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from service.components.build import build_filter
from service.config import Settings
from service.errors import InvalidInput, StepRejected
from service.filters.batched import batchable, batched_key, batched_step
from service.filters.ekf import GaussState
from service.hosting.engine import Engine
from service.schemas import ModelSpec, PredictRequest, UpdateRequest
from service.store import Backend, MemoryStore, SoleWriter, SQLiteStore, Store
from service.testing import MakeServer, in_process, linear_spec, mlp_spec

I = 4  # the input dimension
PROBE = PredictRequest(x=[[0.5, -1.0, 0.25, 2.0], [1.0, 0.0, -0.5, 0.1]])


def _spec(name: str, dtype: str = "float64", **fields: Any) -> ModelSpec:
    return ModelSpec.model_validate(linear_spec(name, I, filter="kalman", dtype=dtype, **fields))


def _row(model: int, i: int) -> tuple[list[float], float]:
    rng = np.random.default_rng(1000 * model + i)
    x = rng.normal(size=I).round(6)
    return x.tolist(), float(round(x @ [0.5, -1.0, 0.25, 2.0] + rng.normal(0, 0.3), 6))


def _states(spec: ModelSpec, n: int, dtype: torch.dtype) -> list[GaussState]:
    """n distinct states of spec's filter: a few eager steps from its prior each."""
    f = build_filter(spec)
    states = []
    for m in range(n):
        s = f.init(dtype=dtype, device=torch.device("cpu"))
        for i in range(3):
            x, y = _row(m, i)
            s, _ = f.run(s, torch.tensor([x], dtype=dtype), torch.tensor([y], dtype=dtype))
        states.append(s)
    return states


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_models_slice_of_a_batch_is_its_own_step_bit_for_bit(dtype: str) -> None:
    spec = _spec("m", dtype, likelihood={"type": "gaussian", "noise_variance": 0.3})
    f, dt = build_filter(spec), getattr(torch, dtype)
    N = 300
    states = _states(spec, N, dt)
    rows = [_row(m, 10) for m in range(N)]
    x = torch.tensor([[r[0]] for r in rows], dtype=dt)  # (N, 1, I)
    y = torch.tensor([[r[1]] for r in rows], dtype=dt)  # (N, C)
    step = batched_step(f, states[0])
    assert batchable(f) and step.key == batched_key(f, states[0])
    together = step(states, x, y)
    for m in [0, 1, 7, 150, N - 1]:  # alone, and in batches of other sizes and places
        for batch in (slice(m, m + 1), slice(max(0, m - 5), m + 3)):
            (alone,) = [
                r
                for r, k in zip(
                    step(states[batch], x[batch], y[batch]), range(N)[batch], strict=True
                )
                if k == m
            ]
            both = together[m]
            assert alone is not None and both is not None
            assert torch.equal(alone.state.mean, both.state.mean)
            assert torch.equal(alone.state.cov, both.state.cov)
            assert alone.report == both.report
    tol = 1e-12 if dtype == "float64" else 1e-5
    for m in range(0, N, 37):  # the eager step, to rounding
        done = together[m]
        assert done is not None
        eager, infos = f.run(states[m], x[m], y[m, :1])
        assert torch.allclose(done.state.mean, eager.mean, atol=tol, rtol=tol)
        assert torch.allclose(done.state.cov, eager.cov, atol=tol, rtol=tol)
        assert abs(done.report.log_likelihood - float(infos[0].log_likelihood)) < tol * 10


def test_the_batched_step_is_the_kalman_posterior() -> None:
    """Against a NumPy Kalman update (Joseph form) of each model's state, written here."""
    spec = _spec("m", likelihood={"type": "gaussian", "noise_variance": 0.3})
    f = build_filter(spec)
    states = _states(spec, 20, torch.float64)
    rows = [_row(m, 20) for m in range(20)]
    x = torch.tensor([[r[0]] for r in rows], dtype=torch.float64)
    y = torch.tensor([[r[1]] for r in rows], dtype=torch.float64)
    for s, (xr, yr), done in zip(
        states, rows, batched_step(f, states[0])(states, x, y), strict=True
    ):
        m, P = s.mean.numpy(), s.cov.numpy()
        h = np.array([*xr, 1.0])  # the bias is the last parameter
        S = h @ P @ h + 0.3
        K = P @ h / S
        want_m = m + K * (yr - h @ m)
        A = np.eye(len(m)) - np.outer(K, h)
        want_P = A @ P @ A.T + 0.3 * np.outer(K, K)
        assert done is not None
        np.testing.assert_allclose(done.state.mean.numpy(), want_m, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(done.state.cov.numpy(), want_P, rtol=1e-11, atol=1e-12)
        lp = -0.5 * (math.log(2 * math.pi * S) + (yr - h @ m) ** 2 / S)
        assert abs(done.report.log_likelihood - lp) < 1e-10
        assert abs(done.report.mean[0] - h @ m) < 1e-12
        assert abs(done.report.variance[0] - S) < 1e-12


def test_a_failed_check_leaves_that_model_to_the_eager_step() -> None:
    spec = _spec("m")
    f = build_filter(spec)
    states = _states(spec, 5, torch.float64)
    x = torch.tensor([[_row(m, 5)[0]] for m in range(5)], dtype=torch.float64)
    x[2, 0, 1] = math.inf
    y = torch.ones((5, 1), dtype=torch.float64)
    done = batched_step(f, states[0])(states, x, y)
    assert done[2] is None and all(done[m] is not None for m in (0, 1, 3, 4))


def test_only_the_filters_whose_batches_keep_their_bits_are_batched() -> None:
    assert batchable(build_filter(_spec("k")))
    for other in (
        linear_spec("e", I, filter="ekf"),
        linear_spec("l", I, filter={"type": "lofi", "rank": 2}),
        mlp_spec("d", I, [8], filter="diagonal"),
        linear_spec("b", I, likelihood="bernoulli", filter="ekf"),
    ):
        assert not batchable(build_filter(ModelSpec.model_validate(other))), other["name"]


# -- through the engine ------------------------------------------------------------------------


def _engine(store: Store, batch: bool) -> Engine:
    settings = Settings(
        store="memory", device="cpu", snapshot_every=7, snapshot_interval_s=3600,
        batch_steps=batch,
    )  # fmt: skip
    return Engine(settings, Backend(store, SoleWriter()))


def _run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


async def _started(engine: Engine) -> Engine:
    await engine.start()
    while not engine.ready:
        await asyncio.sleep(0.005)
    return engine


MODELS, ROUNDS = 40, 5


async def _fill(engine: Engine, concurrently: bool) -> list[list[bytes]]:
    """ROUNDS updates of each of MODELS models: each round all at once, or one by one."""
    for m in range(MODELS):
        await engine.create(_spec(f"m{m}"))
    answers: list[list[bytes]] = [[] for _ in range(MODELS)]

    async def one(m: int, i: int) -> None:
        x, y = _row(m, i)
        answers[m].append(await engine.update_json(f"m{m}", UpdateRequest(x=[x], y=[y])))

    for i in range(ROUNDS):
        if concurrently:
            await asyncio.gather(*(one(m, i) for m in range(MODELS)))
        else:
            for m in range(MODELS):
                await one(m, i)
    return answers


def _tensors(engine: Engine, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = engine.catalogue.get(f"m{m}").current.state
    return s.mean, s.cov


def test_models_stepped_together_end_where_they_end_alone() -> None:
    async def body() -> None:
        together = await _started(_engine(MemoryStore(), batch=True))
        alone = await _started(_engine(MemoryStore(), batch=True))
        eager = await _started(_engine(MemoryStore(), batch=False))
        a = await _fill(together, concurrently=True)
        b = await _fill(alone, concurrently=False)
        await _fill(eager, concurrently=True)
        c = together.coalescer
        assert c is not None and c.largest == MODELS and c.rows == MODELS * ROUNDS
        assert c.batches == ROUNDS  # one batched step a round
        assert alone.coalescer is not None and alone.coalescer.largest == 1
        assert a == b  # the answers, byte for byte
        for m in range(MODELS):
            for t, u in zip(_tensors(together, m), _tensors(alone, m), strict=True):
                assert torch.equal(t, u)
            for t, u in zip(_tensors(together, m), _tensors(eager, m), strict=True):
                assert torch.allclose(t, u, rtol=1e-12, atol=1e-13)
        for e in (together, alone, eager):
            await e.stop()

    _run(body)


def test_bad_rows_in_a_batch_are_refused_alone_and_change_nothing() -> None:
    async def body() -> None:
        engine = await _started(_engine(MemoryStore(), batch=True))
        for m in range(6):
            await engine.create(_spec(f"m{m}"))
        before = {m: _tensors(engine, m) for m in range(6)}
        rows = [_row(m, 0) for m in range(6)]
        bad: dict[int, UpdateRequest] = {
            1: UpdateRequest(x=[[1.0, 1e200, 0.0, 0.0]], y=[0.5]),  # x P x^T overflows
            4: UpdateRequest(x=[_row(4, 0)[0]], y=[1e308]),  # so does the innovation's square
        }
        reqs = [bad.get(m, UpdateRequest(x=[rows[m][0]], y=[rows[m][1]])) for m in range(6)]
        out = await asyncio.gather(
            *(engine.update_json(f"m{m}", r) for m, r in enumerate(reqs)), return_exceptions=True
        )
        for m, o in enumerate(out):
            h = engine.catalogue.get(f"m{m}")
            if m in bad:
                assert isinstance(o, StepRejected | InvalidInput), o
                assert h.version == 0
                for t, u in zip(before[m], _tensors(engine, m), strict=True):
                    assert torch.equal(t, u)
            else:
                assert isinstance(o, bytes) and h.version == 1, o
        assert engine.coalescer is not None and engine.coalescer.largest == 6
        await engine.stop()

    _run(body)


@pytest.mark.parametrize("batch_on_restart", [True, False])
def test_a_restart_replays_batched_records_to_the_same_bits(
    tmp_path: Path, batch_on_restart: bool
) -> None:
    async def body() -> None:
        store = SQLiteStore(tmp_path / "store.sqlite3")
        first = await _started(_engine(store, batch=True))
        await _fill(first, concurrently=True)  # snapshots at 7; records after it replay
        want = {m: _tensors(first, m) for m in range(MODELS)}
        predicted = await first.predict("m3", PROBE)
        first.catalogue.ready = False  # a crash: no final snapshot
        await first.store.close()
        again = await _started(_engine(SQLiteStore(tmp_path / "store.sqlite3"), batch_on_restart))
        for m in range(MODELS):
            assert again.catalogue.get(f"m{m}").version == ROUNDS
            for t, u in zip(want[m], _tensors(again, m), strict=True):
                assert torch.equal(t, u)
        assert await again.predict("m3", PROBE) == predicted
        await again.stop()

    _run(body)


# -- through a real server ---------------------------------------------------------------------


def test_concurrent_http_updates_of_many_models_are_batched(make_server: MakeServer) -> None:
    server = make_server(env={"POSTSERVE_BATCH_STEPS": "1", "POSTSERVE_BATCH_WINDOW_MS": "2"})
    n = 24
    specs = [_spec(f"m{m}").model_dump(mode="json") for m in range(n)]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for s in specs:
            assert c.post("/v1/models", json=s).status_code == 201

    def feed(m: int) -> list[dict[str, Any]]:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            out = []
            for i in range(4):
                x, y = _row(m, i)
                r = c.post(f"/v1/models/m{m}/update", json={"x": [x], "y": [y]})
                assert r.status_code == 200, r.text
                out.append(r.json())
            return out

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(feed, range(n)))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        metrics = c.get("/metrics").text
        got = [c.post(f"/v1/models/m{m}/predict", json=PROBE.model_dump()).json() for m in range(n)]
    batched = _metric(metrics, "postserve_batched_rows_total")
    steps = _metric(metrics, "postserve_batched_steps_total")
    assert batched == 4 * n and steps < 4 * n, (batched, steps)  # some rows shared a step
    with in_process(batch_steps=True) as twin:  # each model alone: the same bits
        for m in range(n):
            twin.post("/v1/models", json=specs[m]).raise_for_status()
            for i in range(4):
                x, y = _row(m, i)
                r = twin.post(f"/v1/models/m{m}/update", json={"x": [x], "y": [y]})
                assert r.json() == answers[m][i]
            assert twin.post(f"/v1/models/m{m}/predict", json=PROBE.model_dump()).json() == got[m]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")
