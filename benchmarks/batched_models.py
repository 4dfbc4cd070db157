"""Many small models updated at once: one at a time against cross-model batching, in one run.

N Kalman models (``Linear(16)``, 17 parameters, a gaussian likelihood), each with a distinct
state, take one row each, N = 1, 10, 100, 1,000 (``--models``); updates per second, medians of
interleaved rounds, one thread:

- **step**: the filter alone. One at a time is ``OnlineFilter.run`` of one row per model (the
  eager step the service takes without kernels); batched is one ``BatchedStep`` call over the N
  stacked states (``service.filters.batched``: the same traced step mapped over the models).
- **engine**: the whole update path in process (``Engine.update_json``, memory store: admission,
  lock, the step, the answer, the log record and its append, publication, calibration and
  influence), N updates issued together (``asyncio.gather``) per round, with
  ``batch_steps`` off (each model stepped alone) and on (their rows coalesced into one batched
  step per round).

The process is tuned as the server's is (``service.runtime``: malloc thresholds, the cyclic
collector's), and the models are frozen out of the collector's scans once built, as the engine
does once it has restored its models at start (``--no-freeze``: not).

    python -m benchmarks.batched_models [--models 1 10 100 1000] [--dtype float64] [--seconds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Callable

import torch

from service.components.build import build_filter
from service.config import Settings
from service.filters.batched import batched_step
from service.filters.ekf import GaussState
from service.hosting.engine import Engine
from service.runtime import tune_allocator, tune_gc
from service.schemas import ModelSpec, UpdateRequest
from service.store import Backend, MemoryStore, SoleWriter

INPUTS = 16
FREEZE = [True]  # --no-freeze: models and states stay in the cyclic collector's scans


def _spec(name: str, dtype: str) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": name,
            "network": {"type": "linear", "input_dim": INPUTS, "output_dim": 1},
            "likelihood": {"type": "gaussian", "noise_variance": 0.5},
            "filter": {"type": "kalman"},
            "dtype": dtype,
        }
    )


def _rows(n: int, seed: int) -> tuple[list[list[float]], list[float]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, INPUTS), generator=g, dtype=torch.float64)
    y = x @ torch.linspace(-1, 1, INPUTS, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g)
    return x.tolist(), y.tolist()


def _rate(fn: Callable[[], None], updates: int, seconds: float) -> float:
    """Updates per second of ``fn`` (``updates`` each call), over at least ``seconds``."""
    fn()  # warm
    calls, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        fn()
        calls += 1
    return calls * updates / elapsed


def step_rates(n: int, dtype: str, seconds: float) -> tuple[float, float]:
    """(one at a time, batched) updates/s of the filter's step on n models."""
    spec = _spec("m", dtype)
    f, dt = build_filter(spec), getattr(torch, dtype)
    x, y = _rows(n, 1)
    X = torch.tensor(x, dtype=dt).unsqueeze(1)  # (n, 1, I)
    Y = torch.tensor(y, dtype=dt).unsqueeze(1)  # (n, 1)
    states: list[GaussState] = []
    for i in range(n):  # distinct states: two eager steps each
        s = f.init(dtype=dt, device=torch.device("cpu"))
        for k in range(2):
            s, _ = f.run(s, X[(i + k + 1) % n], Y[(i + k + 1) % n])
        states.append(s)
    if FREEZE[0]:  # as the engine does once it has restored its models at start
        gc.freeze()
    step = batched_step(f, states[0])
    alone_n = min(n, 100)  # one at a time costs the same per model at any n

    def alone() -> None:
        for i in range(alone_n):
            f.run(states[i], X[i], Y[i])

    def together() -> None:
        step(states, X, Y)

    return _rate(alone, alone_n, seconds), _rate(together, n, seconds)


async def _engine_rate(n: int, dtype: str, batch: bool, rounds: int) -> float:
    settings = Settings(
        store="memory", device="cpu", threads=1, batch_steps=batch,
        snapshot_every=10**9, snapshot_interval_s=10**6,
    )  # fmt: skip
    engine = Engine(settings, Backend(MemoryStore(), SoleWriter()))
    await engine.start()
    while not engine.ready:
        await asyncio.sleep(0.005)
    for i in range(n):
        await engine.create(_spec(f"m{i}", dtype))
    if FREEZE[0]:  # as the engine does once it has restored its models at start
        gc.freeze()
    x, y = _rows(n * (rounds + 1), 2)
    reqs = [UpdateRequest(x=[x[k]], y=[y[k]]) for k in range(len(x))]

    async def round_(r: int) -> None:
        await asyncio.gather(*(engine.update_json(f"m{i}", reqs[r * n + i]) for i in range(n)))

    await round_(rounds)  # warm
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        await round_(r)
        times.append(time.perf_counter() - t0)
    await engine.stop()
    return n / statistics.median(times)


def engine_rates(n: int, dtype: str, seconds: float) -> tuple[float, float]:
    """(batching off, on) updates/s through the engine with n models updated together."""
    rounds = max(5, min(200, int(2000 * seconds / n)))
    off = asyncio.run(_engine_rate(n, dtype, False, rounds))
    on = asyncio.run(_engine_rate(n, dtype, True, rounds))
    return off, on


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", type=int, nargs="+", default=[1, 10, 100, 1000])
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--seconds", type=float, default=1.0, help="per measured rate")
    p.add_argument("--no-freeze", action="store_true", help="leave the models in gc's scans")
    args = p.parse_args()
    FREEZE[0] = not args.no_freeze
    torch.set_num_threads(1)
    tune_allocator()  # the server's process settings (service/cli.py serve)
    tune_gc()
    print(
        f"Kalman Linear({INPUTS}), {args.dtype}, one thread, models frozen out of gc's scans: "
        f"{FREEZE[0]}; updates/s\n\n"
        "| models N | step: one at a time | step: batched | ratio | "
        "engine: one at a time | engine: batched | ratio |\n|---|---|---|---|---|---|---|"
    )
    for n in args.models:
        alone, together = step_rates(n, args.dtype, args.seconds)
        off, on = engine_rates(n, args.dtype, args.seconds)
        print(
            f"| {n:,} | {alone:,.0f} | {together:,.0f} | {together / alone:.1f}x | "
            f"{off:,.0f} | {on:,.0f} | {on / off:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
