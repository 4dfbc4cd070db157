"""What makes neural Thompson sampling explore: a grid over the draws and the prior, in process.

Arms as outputs (one output per arm, the reward observing the chosen output alone): an MLP over
the context (``--hidden``, relu), LoFi (``--rank``), a gaussian reward model, float32, run with
``OnlineFilter.run`` and ``policy.decide`` directly (no HTTP: the same math the server runs,
faster to sweep). For each (draws, prior variance, noise variance) of the grid and each seed:
the cumulative reward at T and at every thousandth step. ``--strategies`` may add ``greedy``
(the posterior mean, no exploration) as the reference that shows what exploration adds.

    python -m benchmarks.bandits.explore --task mnist --steps 2000 \\
        [--draws linearized parameters] [--priors 0.001 0.01] [--noises 0.01 0.1] [--seeds 0 1]

The benchmark proper, through HTTP with the baselines, is :mod:`benchmarks.bandits.run`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bandits import data
from service.components.build import build_filter
from service.policy import decide
from service.schemas import ModelSpec


def run(
    task: data.Task, hidden: list[int], rank: int, draws: str, prior: float, noise: float, seed: int
) -> dict[str, Any]:
    spec = ModelSpec.model_validate(
        {
            "name": "explore",
            "network": {
                "type": "mlp", "input_dim": task.n_features, "hidden": hidden,
                "output_dim": task.n_arms, "activation": "relu",
            },
            "likelihood": {"type": "gaussian", "noise_variance": noise},
            "filter": {"type": "lofi", "rank": rank},
            "prior": {"variance": prior},
            "seed": seed,
        }
    )  # fmt: skip
    f = build_filter(spec)
    state = f.init(dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    total, curve, t0 = 0.0, [], time.perf_counter()
    strategy = "greedy" if draws == "greedy" else "thompson"
    for t in range(len(task.contexts)):
        x = torch.tensor(task.contexts[t : t + 1], dtype=torch.float32)
        d = decide(
            f, f.predict(state), x, strategy, generator=gen, propensity_samples=1,
            linearized=draws == "linearized",
        )  # fmt: skip
        r = task.reward(t, d.action, rng)
        total += r
        state, _ = f.run(state, x, torch.tensor([r]), outputs=[d.action])
        if (t + 1) % 1000 == 0:
            curve.append(total)
    return {"reward": total, "curve": curve, "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", default="mnist", choices=list(data.TASKS))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--hidden", type=int, nargs="+", default=[50])
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--draws", nargs="+", default=["linearized", "parameters"],
                   choices=["linearized", "parameters", "greedy"])  # fmt: skip
    p.add_argument("--priors", type=float, nargs="+", default=[0.001])
    p.add_argument("--noises", type=float, nargs="+", default=[0.01])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/bandits"))
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.task in ("shuttle", "mushroom"):
        data.fetch()
    rows = []
    for draws, prior, noise in itertools.product(args.draws, args.priors, args.noises):
        runs = []
        for seed in args.seeds:
            task = data.load(args.task, seed, args.steps)
            runs.append(run(task, args.hidden, args.rank, draws, prior, noise, seed))
        rewards = [r["reward"] for r in runs]
        rows.append({"draws": draws, "prior": prior, "noise": noise, "runs": runs})
        print(
            f"{draws:>10} prior {prior:g} noise {noise:g}: reward {np.mean(rewards):.0f} "
            f"({', '.join(f'{r:.0f}' for r in rewards)}); by thousand "
            f"{[round(c) for c in runs[0]['curve']]}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"explore_{args.task}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
