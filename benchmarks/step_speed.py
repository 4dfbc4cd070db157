"""One observation's filtering step for small models, against a NumPy Kalman step and `posteriors`.

In one run, float32, one thread, interleaved rounds (medians), so the ratios hold on a noisy
machine even when the absolute times do not:

- ``numpy kalman``: a ten-line NumPy Kalman step on a 17-parameter linear-Gaussian model (the
  floor for a step written in Python over arrays);
- ``kalman Linear(16)``: ``OnlineFilter.run`` of one row on the same model (validation, predict,
  update, the pre-update predictive and log density, one settle of the checks);
- ``lofi-10 mlp 8-32-1`` and ``diagonal mlp 8-32-1``: the same on an MLP (D = 321);
- ``posteriors diag_fisher mlp 8-32-1``: `posteriors.ekf.diag_fisher.update` on the same MLP with a
  Gaussian log likelihood (its Jacobian by autograd);
- ``kalman Linear(16), 100 rows``: ``OnlineFilter.run`` of one 100-row request on the Kalman
  model, as one block update (``docs/algorithms.md`` 3.7, what ``run`` does) and through the
  row-by-row loop that ``run`` takes otherwise (``OnlineFilter._run_rows``); reported per row too,
  against the NumPy step.
- with ``--kernels DIR``: the one-row Kalman and LoFi cases with their compiled steps
  (``service.filters.compiled``, compiled into DIR first, seconds to a minute each): ``run`` of one
  row as above, and the kernel alone (the step: no validation, encoding or settling of checks).

    python -m benchmarks.step_speed [--rounds 7] [--n 300] [--kernels /tmp/postserve-kernels]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from service.filters import MLP, Diagonal, Gaussian, Kalman, Linear, LoFi, OnlineFilter, Prior
from service.filters.algorithm import S
from service.filters.compiled import compile_step

ROWS = 100  # rows of the many-row request


def _median_us(fn: Callable[[], object], n: int) -> float:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e6


def _numpy_kalman(D: int) -> Callable[[], object]:
    rng = np.random.default_rng(0)
    m, P = np.zeros(D, np.float32), np.eye(D, dtype=np.float32)
    h, y, r = rng.standard_normal(D).astype(np.float32), 0.3, 0.5

    def step() -> object:
        Ph = P @ h
        S = h @ Ph + r
        K = Ph / S
        e = y - h @ m
        ll = -0.5 * (e * e / S + math.log(S) + math.log(2 * math.pi))
        return m + K * e, P - np.outer(K, Ph), ll

    return step


def _ours(
    f: OnlineFilter[S],
    seed: int,
    rows: int = 1,
    loop: bool = False,
    kernels: Path | None = None,
    only_kernel: bool = False,
) -> Callable[[], object]:
    """``f.run`` of one request of ``rows`` rows (``loop``: through the row-by-row loop; with
    ``kernels``, with its compiled step kept there; ``only_kernel``: that step alone, one row)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, f.network.input_dim, generator=g)
    y = torch.randn(rows, generator=g)
    state, _ = f.run(f.init(), torch.randn(20, f.network.input_dim, generator=g), torch.randn(20))
    if loop:
        Y = f.encode(y)
        return lambda: f._run_rows(state, x, Y)
    if kernels is None:
        return lambda: f.run(state, x, y)
    kernel = compile_step(f, state, kernels)
    if only_kernel:
        Y0 = f.encode(y)[0]
        return lambda: kernel(state, x, Y0)
    return lambda: f.run(state, x, y, kernel)


def _posteriors_diag(net: MLP) -> Callable[[], object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from posteriors.ekf import diag_fisher
    theta0 = net.init_mean(torch.Generator().manual_seed(0)).float()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(1, net.input_dim, generator=g), torch.randn(1, 1, generator=g))

    def log_likelihood(theta: torch.Tensor, b: tuple[torch.Tensor, torch.Tensor]) -> object:
        x, y = b
        mu = net.apply(theta, x)
        return -0.5 * (((y - mu) ** 2) / 0.5).sum(), mu

    transform = diag_fisher.build(log_likelihood, lr=1.0, init_sds=1.0)
    state = transform.init(theta0)
    return lambda: transform.update(state, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=300, help="calls per case per round")
    parser.add_argument(
        "--kernels",
        type=Path,
        default=None,
        help="also the compiled steps (service.filters.compiled), kept in this directory",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    mlp = MLP(8, (32,), 1, "relu")
    kalman = OnlineFilter(Linear(16), Gaussian(0.5), Kalman(), prior=Prior(1.0))
    lofi = OnlineFilter(
        mlp, Gaussian(0.5), LoFi(10, orthogonal=True), prior=Prior(1.0)
    )  # q = 0: as built
    compiled: dict[str, Callable[[], object]] = {}
    if args.kernels is not None:
        print("compiling (or loading) the two steps ...", flush=True)
        k = args.kernels
        compiled = {
            "kalman compiled: run": _ours(kalman, 0, kernels=k),
            "kalman compiled: the kernel alone": _ours(kalman, 0, kernels=k, only_kernel=True),
            "lofi-10 compiled: run": _ours(lofi, 1, kernels=k),
            "lofi-10 compiled: the kernel alone": _ours(lofi, 1, kernels=k, only_kernel=True),
        }
    cases: dict[str, Callable[[], object]] = {
        "numpy kalman (D = 17)": _numpy_kalman(17),
        "kalman Linear(16) (D = 17)": _ours(kalman, 0),
        "lofi-10 mlp 8-32-1 (D = 321)": _ours(lofi, 1),
        **compiled,
        "diagonal mlp 8-32-1 (D = 321)": _ours(
            OnlineFilter(mlp, Gaussian(0.5), Diagonal(), prior=Prior(1.0)), 2
        ),
        "posteriors diag_fisher mlp 8-32-1": _posteriors_diag(mlp),
        "kalman Linear(16), 100 rows, block": _ours(kalman, 3, rows=ROWS),
        "kalman Linear(16), 100 rows, row by row": _ours(kalman, 3, rows=ROWS, loop=True),
    }
    calls = {k: max(3, args.n // 30) if "100 rows" in k else args.n for k in cases}
    for name, fn in cases.items():  # warm-up
        for _ in range(max(3, calls[name] // 6)):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            times[name].append(_median_us(fn, calls[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["numpy kalman (D = 17)"]
    print(f"{'case':42s} {'us':>9s} {'us a row':>9s} {'a row / numpy kalman':>21s}")
    for name, us in med.items():
        rows = ROWS if "100 rows" in name else 1
        print(f"{name:42s} {us:9.1f} {us / rows:9.1f} {us / rows / base:21.2f}")
    ratio = med["diagonal mlp 8-32-1 (D = 321)"] / med["posteriors diag_fisher mlp 8-32-1"]
    print(f"\ndiagonal EKF / posteriors diag_fisher (same MLP): {ratio:.2f}")
    block = (
        med["kalman Linear(16), 100 rows, row by row"] / med["kalman Linear(16), 100 rows, block"]
    )
    print(f"kalman, one 100-row request: row by row / block: {block:.1f}")


if __name__ == "__main__":
    main()
