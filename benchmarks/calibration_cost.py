"""What calibration costs on the update path, and what a scrape of /metrics costs.

Per row, the engine runs the filter step (``OnlineFilter.run``) and then scores the row's
pre-update prediction (the likelihood kind's ``score`` + ``CalibrationTracker.observe``). This
times both, interleaved in one run, for the models of the HTTP benchmark (one row per update, as
there) and reports the scoring's cost as a ratio to the step's. It then times rendering /metrics
(``generate_latest``) with 1, 10 and 100 monitored models, each with a full calibration window.

    python -m benchmarks.calibration_cost
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import generate_latest

from benchmarks.http.bench_http import COMMON, MODELS
from service.calibration import CalibrationTracker
from service.components import LIKELIHOODS
from service.components.build import build_filter
from service.config import Settings
from service.hosting import Engine
from service.metrics import make_registry
from service.schemas import ModelSpec
from service.store import Backend, MemoryStore, SoleWriter


def _median_us(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def _time_model(name: str, body: dict[str, Any]) -> tuple[float, float]:
    """Median microseconds of one filter step and of scoring its row, interleaved."""
    spec = ModelSpec.model_validate({"name": name, **COMMON, **body})
    f = build_filter(spec)
    state = f.init()
    x = torch.full((1, spec.network.input_dim), 0.1)
    y_raw = [0.3]
    y = torch.tensor(y_raw)
    tracker = CalibrationTracker()
    score_rows = LIKELIHOODS[spec.likelihood.type].score
    for _ in range(50):  # warm-up
        state, infos = f.run(state, x, y)

    def step() -> None:
        f.run(state, x, y)

    def score() -> None:
        for o in score_rows(f.likelihood, infos, y_raw):
            tracker.observe(o, 1)

    steps, scores = [], []
    for _ in range(7):  # alternate so that drift hits both alike
        steps.append(_median_us(step, 200))
        scores.append(_median_us(score, 200))
    return statistics.median(steps), statistics.median(scores)


def update_path() -> None:
    torch.set_num_threads(1)
    print("model               step us   scoring us   scoring / step")
    for name, body in MODELS.items():
        step, cost = _time_model(name, body)
        print(f"{name:18s} {step:9.1f} {cost:12.1f} {cost / step:14.3f}")


def _scrape(n: int) -> tuple[float, int]:
    """Milliseconds to render /metrics with n monitored models with full windows, and bytes."""
    engine = Engine(Settings(store="memory"), Backend(MemoryStore(), SoleWriter()))
    catalogue = engine.catalogue
    catalogue.ready = True
    for i in range(n):
        spec = ModelSpec.model_validate(
            {"name": f"m{i}", "monitor": True, **COMMON, **MODELS["linear16-kalman"]}
        )
        h = catalogue.host(spec)
        x, y = torch.randn(1000, 16), torch.randn(1000)
        _, _, obs = h.step(h.current.state, x.tolist(), y.tolist())
        h.score(0, obs)
        catalogue.models[spec.name] = h
    registry = make_registry(engine)
    return _median_us(lambda: generate_latest(registry), 20) / 1000, len(generate_latest(registry))


def scrape() -> None:
    print("\nmonitored models   /metrics render ms   bytes")
    for n in (1, 10, 100):
        ms, size = _scrape(n)
        print(f"{n:16d} {ms:20.2f} {size:7d}")


if __name__ == "__main__":
    update_path()
    scrape()
