"""Speed of one LoFi step against the unavoidable work, measured in one run (not a test).

One step = ``LoFi.predict`` + ``LoFi.condition_on`` (truncation included) on a fixed Jacobian row
J (1, D), float32, CPU, one thread. The reference is one Gram product Z Z^T of a (d+1) x D float32
matrix, the least any step must do (it reads every number of the state once). Timings of the two
are interleaved and the medians compared, so the ratio is meaningful on a noisy machine even when
the absolute times are not.

    python -m benchmarks.filter_speed [--out benchmarks/out/filter_speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from service.filters import Linearization, LoFi, LoFiState
from service.runtime import tune_allocator


def _time(fn, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(D: int, d: int, decay: float, q: float, rounds: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    lofi = LoFi(rank=d)
    state = LoFiState(
        mean=torch.randn(D, generator=g),
        W=torch.randn(d, D, generator=g) * 0.1,
        upsilon=torch.rand(D, generator=g) + 0.5,
    )
    J = torch.randn(1, D, generator=g) / D**0.5
    lin = Linearization(yhat=torch.zeros(1), J=J, V=None, R=torch.full((1, 1), 0.5))
    y = torch.ones(1)
    Z = torch.randn(d + 1, D, generator=g)

    def step() -> None:
        lofi.condition_on(lofi.predict(state, decay, q), lin, y)

    def gram() -> None:
        torch.mm(Z, Z.T)

    for _ in range(5):
        step()
        gram()
    steps: list[float] = []
    grams: list[float] = []
    for _ in range(rounds):
        steps += _time(step, 3)
        grams += _time(gram, 3)
    s, gm = statistics.median(steps), statistics.median(grams)
    return {
        "D": D,
        "d": d,
        "decay": decay,
        "q": q,
        "step_ms": s * 1e3,
        "gram_ms": gm * 1e3,
        "ratio": s / gm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/filter_speed.json"))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="skip the allocator tuning the service applies",
    )
    args = parser.parse_args()
    tuned = False if args.default_malloc else tune_allocator()
    torch.set_num_threads(1)
    rows = []
    for D in (10_000, 100_000):
        for decay, q in ((0.999, 1e-4), (1.0, 0.0)):
            rounds = args.rounds if D <= 10_000 else max(args.rounds // 4, 5)
            rows.append(measure(D, 10, decay, q, rounds))
    print(
        f"torch {torch.__version__}, float32, CPU, 1 thread, d = 10, C = 1, allocator tuned: {tuned}"
    )
    print(f"{'D':>8} {'decay':>6} {'q':>7} {'step ms':>9} {'gram ms':>9} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['D']:>8} {r['decay']:>6} {r['q']:>7} {r['step_ms']:>9.3f} {r['gram_ms']:>9.3f}"
            f" {r['ratio']:>6.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
