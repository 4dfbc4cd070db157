"""One filter step on the talk's networks, per filter, next to one Gram product of the same size.

The networks of the Fashion-MNIST benchmark (:mod:`benchmarks.fashion_mnist`): the MLP
784-500-500-10 (D = 648,010) and LeNet-5 (D = 61,706), a categorical likelihood, float32, one
thread. One step = ``OnlineFilter.run`` on one row (predict, the network's Jacobian, the update,
the checks), after a few warm steps. The reference is one Gram product Z Z^T of an 11 x D
float32 matrix (what LoFi-10 must at least do: read a (d + 1) x D state once, as in
:mod:`benchmarks.filter_speed`). The two are timed interleaved and their medians compared, so
the ratio means something on a noisy machine where the absolute times do not.

    python -m benchmarks.network_steps [--nets mlp lenet5] [--filters lofi-10 sgd ...] \\
        [--rounds 15] [--out benchmarks/out/network_steps.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.fashion_mnist import NETS
from service.components.build import build_filter
from service.schemas import ModelSpec

FILTERS: dict[str, dict[str, Any]] = {
    "lofi-1": {"type": "lofi", "rank": 1},
    "lofi-10": {"type": "lofi", "rank": 10},
    "lofi-50": {"type": "lofi", "rank": 50},
    "diagonal": {"type": "diagonal"},
    "subspace-100": {"type": "subspace", "dim": 100},
    "pulse-100": {"type": "pulse", "dim": 100},
    "last_layer": {"type": "last_layer"},
    "sgd": {"type": "sgd", "learning_rate": 0.05},
    "replay_sgd-10": {"type": "replay_sgd", "buffer": 10, "learning_rate": 0.05},
    "adam": {"type": "sgd", "optimizer": "adam", "learning_rate": 3e-4},
    "replay_adam-10": {
        "type": "replay_sgd",
        "optimizer": "adam",
        "buffer": 10,
        "learning_rate": 3e-4,
    },
}


def _median(
    fn: Callable[[], object], ref: Callable[[], object], rounds: int
) -> tuple[float, float]:
    a, b = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref()
        b.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def measure(net: str, filt: str, rounds: int) -> dict[str, float]:
    spec = ModelSpec.model_validate({
        "name": "steps", "network": NETS[net], "likelihood": {"type": "categorical"},
        "filter": FILTERS[filt], "prior": {"variance": 0.1}, "dtype": "float32",
    })  # fmt: skip
    f = build_filter(spec)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 784, generator=g)
    y = torch.tensor([3.0, 1.0, 4.0, 1.0])
    state, _ = f.run(f.init(), x[:3], y[:3])  # warm: allocations, lazy copies
    base = getattr(f.network, "base", f.network)  # a projected filter's full network
    D = int(base.num_params)
    Z = torch.randn(11, D, generator=g)
    step, gram = _median(lambda: f.run(state, x[3:], y[3:]), lambda: Z @ Z.T, rounds)
    return {"D": D, "P": f.num_params, "step_ms": 1e3 * step,
            "gram_ms": 1e3 * gram, "ratio": step / gram}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--filters", nargs="+", default=list(FILTERS), choices=list(FILTERS))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/network_steps.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(
        "| network | filter | D | P (filter's parameters) | step (ms) | Gram 11 x D (ms) | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for net in args.nets:
        for filt in args.filters:
            r = {"net": net, "filter": filt, **measure(net, filt, args.rounds)}
            rows.append(r)
            print(f"| {net} | {filt} | {r['D']:,} | {r['P']:,} | {r['step_ms']:.1f} | "
                  f"{r['gram_ms']:.2f} | {r['ratio']:.1f} |", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
