"""Where one /update (or /predict) spends its time, in process, layer by layer (not a test).

Builds the benchmark app (``benchmarks/http/app.py``, memory store, one thread) and times, per
call, medians over interleaved rounds:

- ``filter``: ``OnlineFilter.run`` on ready tensors (the math alone);
- ``engine``: ``Engine.update`` / ``Engine.predict`` on a parsed request (adds tensor building,
  the response model, the log record, the store append);
- ``asgi``: the whole app through ``httpx.ASGITransport`` (adds routing, pydantic parsing and
  serialisation, the middlewares, and httpx's own client cost), next to the no-op route through the
  same transport, so ``asgi - asgi no-op`` is what the route costs beyond a trivial POST (the
  transport itself costs ~0.2 ms a request: httpx tries to import trio on each one; it cancels).

Then, with ``--cprofile``, a cProfile of N ASGI requests of the chosen case, top functions.

    python -m benchmarks.http.profile_update [--model mlp10k-lofi] [--n 2000] [--cprofile]
        [--kernels DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import torch

from benchmarks.http.bench_http import COMMON, MODELS, ROW
from service.schemas import PredictRequest, UpdateRequest


async def _time(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e6


async def main_async(
    model: str, n: int, rounds: int, profile: str | None, kernels: str | None
) -> None:
    os.environ.update(
        POSTSERVE_STORE="memory", POSTSERVE_THREADS="1", POSTSERVE_LOG_LEVEL="warning"
    )
    if kernels is not None:
        os.environ.update(POSTSERVE_COMPILE_STEPS="1", POSTSERVE_KERNEL_DIR=kernels)
    from benchmarks.http.app import app as factory

    app = factory()
    engine = app.state.engine
    await engine.start()  # what the app's lifespan does
    try:
        while not engine.ready:  # models are restored in the background
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            r = await client.post("/v1/models", json={"name": model, **COMMON, **MODELS[model]})
            r.raise_for_status()
            h = engine.catalogue.get(model)
            while kernels is not None and h.kernel is None:  # built in the background
                if h.kernel_error is not None:
                    raise SystemExit(f"no compiled step: {h.kernel_error}")
                await asyncio.sleep(0.1)
            if kernels is not None:  # the first one-row /predict asks for its kernel
                await engine.predict(model, PredictRequest(x=[ROW]))
                while h.predict_kernel is None:
                    await asyncio.sleep(0.1)
            upd = UpdateRequest(x=[ROW], y=[0.5])
            pred0 = PredictRequest(x=[ROW])
            pred10 = PredictRequest(x=[ROW], num_samples=10, seed=1)
            x = torch.tensor([ROW], dtype=h.dtype)
            y = torch.tensor([0.5], dtype=h.dtype)
            path = f"/v1/models/{model}"

            async def filt_update() -> None:
                h.filter.run(h.current.state, x, y)

            async def hosted_step() -> None:  # what the engine calls: the kernel where built
                h.step(h.current.state, [ROW], [0.5], h.kernel)

            async def filt_predict() -> None:
                f = h.filter
                f.predictive(f.predict(h.current.state), x)

            async def eng_update() -> None:
                await engine.update(model, upd)

            async def eng_predict() -> None:
                await engine.predict(model, pred0)

            async def eng_predict10() -> None:
                await engine.predict(model, pred10)

            def post(url: str, body: dict[str, Any]) -> Callable[[], Awaitable[None]]:
                async def go() -> None:
                    resp = await client.post(url, json=body)
                    if resp.status_code != 200:
                        raise RuntimeError(resp.text)

                return go

            cases = {
                "filter update (run, 1 row)": filt_update,
                "hosted step (kernel if any, 1 row)": hosted_step,
                "filter predict (predict + predictive)": filt_predict,
                "engine.update": eng_update,
                "engine.predict": eng_predict,
                "engine.predict 10 samples": eng_predict10,
                "asgi no-op": post("/bench/noop", {"x": [ROW]}),
                "asgi /update": post(f"{path}/update", {"x": [ROW], "y": [0.5]}),
                "asgi /predict": post(f"{path}/predict", {"x": [ROW]}),
                "asgi /predict 10 samples": post(
                    f"{path}/predict", {"x": [ROW], "num_samples": 10, "seed": 1}
                ),
            }
            for fn in cases.values():  # warm-up
                await _time(fn, 50)
            per_round: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(rounds):
                for k, fn in cases.items():
                    per_round[k].append(await _time(fn, n // rounds))
            med = {k: statistics.median(v) for k, v in per_round.items()}
            print(f"model {model}, {n} calls per case in {rounds} interleaved rounds; median us:")
            for k, v in med.items():
                print(f"  {k:40s} {v:8.1f}")
            noop = med["asgi no-op"]
            print("  beyond the ASGI no-op:")
            for k in ("asgi /update", "asgi /predict", "asgi /predict 10 samples"):
                print(f"  {k:40s} {med[k] - noop:+8.1f}")

            if profile is not None:
                fn = cases[profile]
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(n):
                    await fn()
                prof.disable()
                for key in ("tottime", "cumulative"):
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(30)
                    print(f"\ncProfile of {n} x {profile!r}, by {key}:")
                    print(buf.getvalue())
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=list(MODELS), default="mlp10k-lofi")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--cprofile",
        nargs="?",
        const="asgi /update",
        default=None,
        help="profile one case (default 'asgi /update')",
    )
    parser.add_argument(
        "--kernels", default=None, help="step with the compiled kernel, kept in this directory"
    )
    args = parser.parse_args()
    asyncio.run(main_async(args.model, args.n, args.rounds, args.cprofile, args.kernels))


if __name__ == "__main__":
    main()
