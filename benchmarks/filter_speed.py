"""Speed of one LoFi step against the unavoidable work, measured in one run (not a test).

One step = ``LoFi.predict`` + ``LoFi.condition_on`` (truncation included) on a fixed Jacobian row
J (1, D), float32, CPU, one thread, the LoFi configured as ``build_filter`` configures it (with
q = 0, ``orthogonal``: the rows of W orthogonal, as they are then). The reference is one Gram product Z Z^T of a (d+1) x D float32
matrix, the least any step must do (it reads every number of the state once). Timings of the two
are interleaved and the medians compared, so the ratio is meaningful on a noisy machine even when
the absolute times are not.

With ``--kernels DIR``, also the compiled row step (``service.filters.compiled``) of the same
LoFi on ``Linear(D - 1)``: the step plus the network's Jacobian, output and pre-update predictive,
in one kernel (each compiled into DIR first, seconds to a minute).

    python -m benchmarks.filter_speed [--out benchmarks/out/filter_speed.json] [--kernels DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from service.filters import (
    Dynamics,
    Gaussian,
    Linear,
    Linearization,
    LoFi,
    LoFiState,
    OnlineFilter,
    Prior,
)
from service.filters.compiled import compile_step
from service.runtime import tune_allocator


def _time(fn, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _compiled_step(D: int, d: int, decay: float, q: float, kernels: Path) -> Callable[[], object]:
    """The compiled row step (``service.filters.compiled``) of LoFi-d on ``Linear(D - 1)`` with
    the same dynamics: the step above plus the network's Jacobian [x, 1], its output and the
    pre-update predictive, in one kernel (compiled into ``kernels`` first)."""
    g = torch.Generator().manual_seed(1)
    lofi = LoFi(rank=d, orthogonal=q == 0.0)  # as ``build_filter`` makes it
    f = OnlineFilter(
        Linear(D - 1), Gaussian(0.5), lofi, dynamics=Dynamics(decay, q), prior=Prior(1.0)
    )
    state, _ = f.run(f.init(), torch.randn(2 * d, D - 1, generator=g) / D**0.5, torch.ones(2 * d))
    kernel = compile_step(f, state, kernels)
    x, y = torch.randn(1, D - 1, generator=g) / D**0.5, torch.ones(1)
    return lambda: kernel(state, x, y)


def measure(
    D: int, d: int, decay: float, q: float, rounds: int, kernels: Path | None = None
) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    # as ``build_filter`` makes it: without process noise W's rows stay orthogonal (the state
    # below has such rows), and the truncation's Gram product skips W W^T
    lofi = LoFi(rank=d, orthogonal=q == 0.0)
    W = torch.randn(d, D, generator=g) * 0.1
    if q == 0.0:
        Q, _ = torch.linalg.qr(W.mT)  # orthonormal columns (D, d)
        W = (Q * W.norm(dim=1)).mT
    state = LoFiState(
        mean=torch.randn(D, generator=g), W=W, upsilon=torch.rand(D, generator=g) + 0.5
    )
    J = torch.randn(1, D, generator=g) / D**0.5
    lin = Linearization(yhat=torch.zeros(1), J=J, V=None, R=torch.full((1, 1), 0.5))
    y = torch.ones(1)
    Z = torch.randn(d + 1, D, generator=g)

    def step() -> None:
        lofi.condition_on(lofi.predict(state, decay, q), lin, y)

    def gram() -> None:
        torch.mm(Z, Z.T)

    compiled = None if kernels is None else _compiled_step(D, d, decay, q, kernels)
    for _ in range(5):
        step()
        gram()
        if compiled is not None:
            compiled()
    steps: list[float] = []
    grams: list[float] = []
    fast: list[float] = []
    for _ in range(rounds):
        steps += _time(step, 3)
        grams += _time(gram, 3)
        if compiled is not None:
            fast += _time(compiled, 3)
    s, gm = statistics.median(steps), statistics.median(grams)
    out = {
        "D": D,
        "d": d,
        "decay": decay,
        "q": q,
        "step_ms": s * 1e3,
        "gram_ms": gm * 1e3,
        "ratio": s / gm,
    }
    if fast:
        out.update(compiled_ms=statistics.median(fast) * 1e3)
        out.update(compiled_ratio=statistics.median(fast) / gm)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/filter_speed.json"))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="skip the allocator tuning the service applies",
    )
    parser.add_argument(
        "--kernels",
        type=Path,
        default=None,
        help="also the compiled row step on Linear(D - 1), kept in this directory",
    )
    args = parser.parse_args()
    tuned = False if args.default_malloc else tune_allocator()
    torch.set_num_threads(1)
    rows = []
    for D in (10_000, 100_000):
        for decay, q in ((0.999, 1e-4), (1.0, 0.0)):
            rounds = args.rounds if D <= 10_000 else max(args.rounds // 4, 5)
            rows.append(measure(D, 10, decay, q, rounds, args.kernels))
    print(
        f"torch {torch.__version__}, float32, CPU, 1 thread, d = 10, C = 1, allocator tuned: {tuned}"
    )
    extra = f" {'compiled ms':>11} {'ratio':>6}" if args.kernels else ""
    print(f"{'D':>8} {'decay':>6} {'q':>7} {'step ms':>9} {'gram ms':>9} {'ratio':>6}{extra}")
    for r in rows:
        more = ""
        if "compiled_ms" in r:
            more = f" {r['compiled_ms']:>11.3f} {r['compiled_ratio']:>6.2f}"
        print(
            f"{r['D']:>8} {r['decay']:>6} {r['q']:>7} {r['step_ms']:>9.3f} {r['gram_ms']:>9.3f}"
            f" {r['ratio']:>6.2f}{more}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
