"""The per-decision work of Thompson sampling with propensities, in process, one thread.

On the Shuttle task (7 arms, 9 features), each model of :mod:`benchmarks.bandits.agents` after
500 rewarded steps: ``policy.decide`` of one context with the server's default 256 draws for the
propensities (what one ``/decide`` computes, without HTTP), median microseconds over
``--decisions`` decisions. The layouts and draws:

* ``neural-ts``: actions as rows (7 block rows of 70), parameter draws (256 thetas of D = 3,651
  through the network): the neural bandit before arms as outputs;
* ``neural-ts linearized``: the same model, linearised draws;
* ``neural-arms params``: arms as outputs (9-50-7, D = 857), parameter draws;
* ``neural-arms``: arms as outputs, linearised draws (256 draws of a 7-dimensional Gaussian);
* ``linear-ts`` and ``linear-arms``: the two linear layouts (output-space draws either way).

    python -m benchmarks.bandits.decide_cost [--decisions 300] [--out benchmarks/out/bandits]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bandits import agents as ag
from benchmarks.bandits import data
from service.components.build import build_filter
from service.policy import decide
from service.schemas import ModelSpec

WARM = 500


def _cases(task: data.Task) -> dict[str, tuple[dict[str, Any], bool, bool]]:
    """name -> (spec, arms as outputs, linearised draws)."""
    return {
        "neural-ts": (ag.neural_spec("a", task, 0), False, False),
        "neural-ts linearized": (ag.neural_spec("b", task, 0), False, True),
        "neural-arms params": (ag.neural_arms_spec("c", task, 0, "parameters"), True, False),
        "neural-arms": (ag.neural_arms_spec("d", task, 0, "linearized"), True, True),
        "linear-ts": (ag.linear_spec("e", task), False, False),
        "linear-arms": (ag.linear_arms_spec("f", task), True, False),
    }


def measure(
    task: data.Task, spec: dict[str, Any], arms: bool, linearized: bool, decisions: int
) -> dict[str, float]:
    m = ModelSpec.model_validate(spec)
    f = build_filter(m)
    dtype = getattr(torch, m.dtype)
    state = f.init(dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)

    def rows(t: int) -> torch.Tensor:
        x = task.contexts[t]
        table = x[None, :] if arms else ag.block_rows(x, task.n_arms)
        return torch.tensor(table, dtype=dtype)

    times = []
    for t in range(WARM + decisions):
        X = rows(t)
        t0 = time.perf_counter()
        d = decide(f, f.predict(state), X, "thompson", generator=gen, linearized=linearized)
        if t >= WARM:
            times.append(time.perf_counter() - t0)
        r = task.reward(t, d.action, rng)
        x = X if arms else X[d.action : d.action + 1]
        state, _ = f.run(state, x, torch.tensor([r]), outputs=[d.action] if arms else None)
    return {"decide_us": statistics.median(times) * 1e6, "num_params": f.num_params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--decisions", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/bandits"))
    args = p.parse_args()
    torch.set_num_threads(1)
    data.fetch()
    task = data.load("shuttle", 0, WARM + args.decisions)
    report = {
        name: measure(task, spec, arms, lin, args.decisions)
        for name, (spec, arms, lin) in _cases(task).items()
    }
    base = report["neural-ts"]["decide_us"]
    lines = [
        "# Thompson decision with 256 propensity draws, in process (Shuttle, one thread)",
        "",
        "| model | D | us per decision | vs neural-ts |",
        "|---|---|---|---|",
    ]
    for name, r in report.items():
        lines.append(
            f"| {name} | {r['num_params']:,} | {r['decide_us']:.0f} | {r['decide_us'] / base:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decide_cost.json").write_text(json.dumps(report, indent=2))
    (args.out / "decide_cost.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
