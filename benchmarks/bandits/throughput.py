"""Bandit throughput through the batch routes, next to Vowpal Wabbit in process, in one run.

On the Shuttle task's HTTP models (:mod:`benchmarks.bandits.agents`): with actions as rows,
``linear`` (linear-gaussian Thompson sampling, exact Kalman, 70 inputs: 7 rows of 70 numbers a
decision) and ``neural`` (the 70-50-1 MLP, LoFi rank 10); with arms as outputs (a decision sends
its 9-number context), ``linear-arms`` (9 -> 7 with a bias, exact Kalman) and ``neural-arms``
(the 9-50-7 MLP, LoFi rank 10, linearised Thompson draws). One server
(the app plus the no-op route of ``benchmarks/http/app.py``, memory store, default settings, one
uvicorn worker, pinned to CPU 0 where it can be) and P client processes (pinned to CPU 1), each
looping ``Client.decide_batch`` of B contexts (Thompson, no seed), then ``Client.reward_batch``
of their rewards, for ``--seconds``. Reported per (model, B, P): decisions (each rewarded) per
second, the CPU milliseconds per decision of the server and of the clients, and the clients'
wall milliseconds per item waiting for ``decide_batch`` and for ``reward_batch`` (with one
client: where a round's time goes).

Beside them, from the same run:

- ``vw``: VW ``cb_explore_adf`` predict + learn per second in this process on the same contexts
  (``benchmarks.bandits.run.vw_rate``, the bandit benchmark's baseline), measured before and
  after the HTTP cases (the machine drifts);
- single-call ``/decide`` (one context, 7 action rows, Thompson) p50 latency by wrk at
  concurrency 1, against the no-op route measured before and after it (geometric mean), once with
  the no-op's usual body (one row of 16 numbers) and once with the decide body's 7 rows of 70 as
  its ``x`` (the same bytes to parse).

Every figure that means anything here is a ratio within this run: other work shares the machine.
The client loop's rows are built once (``block_rows(x).tolist()`` per context), as an application
holding its features would; VW's loop builds its text examples in the loop.

    python -m benchmarks.bandits.data     # once: the Shuttle table
    python -m benchmarks.bandits.throughput [--items 1 10 100 400] [--clients 1 2] \\
        [--models linear neural linear-arms neural-arms] [--seconds 4] [--p50-seconds 3] [--out benchmarks/out/bandits]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.bandits import agents as ag
from benchmarks.bandits import data
from benchmarks.bandits.run import cpu_seconds, vw_available, vw_rate
from benchmarks.http.bench_http import LOAD_CPU, ROW, _can_pin, _wait_compiled, _wrk, bench_server
from service.client import Client

CONTEXTS = 2000
MODELS = {
    "linear": "linear-ts",
    "neural": "neural-ts",
    "linear-arms": "linear-arms",
    "neural-arms": "neural-arms",
}
#: The models whose arms are their outputs: items are ``{"context": x}``.
ARMS = ("linear-arms", "neural-arms")


def _spec(model: str, task: data.Task) -> dict[str, Any]:
    name = f"tp-{model}"
    if model == "linear":
        return ag.linear_spec(name, task)
    if model == "linear-arms":
        return ag.linear_arms_spec(name, task)
    if model == "neural-arms":
        return ag.neural_arms_spec(name, task, 0, "linearized")
    return ag.neural_spec(name, task, 0)


# -- a client process ----------------------------------------------------------------------------


def client_loop(
    url: str, model: str, items: int, seconds: float, offset: int, start: Any, out: Any
) -> None:
    """One client process: decide + reward batches of ``items`` contexts for ``seconds`` after
    ``start`` is set; puts (decisions, seconds, CPU seconds, seconds waiting for decide_batch,
    seconds waiting for reward_batch) on ``out``."""
    if _can_pin():
        os.sched_setaffinity(0, {LOAD_CPU})
    task = data.load("shuttle", 0, CONTEXTS)
    if model.removeprefix("tp-") in ARMS:
        bodies = [{"context": x.tolist()} for x in task.contexts]
    else:
        bodies = [{"actions": ag.block_rows(x, task.n_arms).tolist()} for x in task.contexts]
    rng = np.random.default_rng(offset)
    waits = [0.0, 0.0]
    with Client(url, timeout=120.0) as client:
        t = offset

        def one_round() -> None:
            nonlocal t
            at = [(t + k) % CONTEXTS for k in range(items)]
            t += items
            t0 = time.perf_counter()
            decided = client.decide_batch(model, [bodies[i] for i in at])
            t1 = time.perf_counter()
            rewards = [task.reward(i, d.action, rng) for i, d in zip(at, decided, strict=True)]
            pairs = [(d.event_id, r) for d, r in zip(decided, rewards, strict=True)]
            t2 = time.perf_counter()
            client.reward_batch(model, pairs)
            waits[0] += t1 - t0
            waits[1] += time.perf_counter() - t2

        one_round()  # warm: connection, first allocations
        waits[:] = [0.0, 0.0]
        start.wait()
        cpu0, t0 = time.process_time(), time.perf_counter()
        done, end = 0, t0 + seconds
        while time.perf_counter() < end:
            one_round()
            done += items
        out.put((done, time.perf_counter() - t0, time.process_time() - cpu0, *waits))


def batch_rate(
    url: str, pid: int, model: str, items: int, clients: int, seconds: float
) -> dict[str, float]:
    """Decisions per second of ``clients`` processes looping batches of ``items``."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=client_loop, args=(url, model, items, seconds, 997 * k, start, out))
        for k in range(clients)
    ]
    for p in procs:
        p.start()
    time.sleep(3.0 + clients)  # each loads the table and warms up before the start
    server0 = cpu_seconds(pid)
    start.set()
    results = [out.get(timeout=seconds + 600) for _ in procs]
    server_cpu = cpu_seconds(pid) - server0
    for p in procs:
        p.join()
    decisions = sum(r[0] for r in results)
    return {
        "rate": sum(r[0] / r[1] for r in results),
        "server_cpu_ms": server_cpu / decisions * 1e3,
        "client_cpu_ms": sum(r[2] for r in results) / decisions * 1e3,
        "decide_ms": sum(r[3] for r in results) / decisions * 1e3,
        "reward_ms": sum(r[4] for r in results) / decisions * 1e3,
    }


def _wait_output_steps(raw: httpx.Client, url: str, name: str, task: data.Task) -> None:
    """One decide + reward (which ask for the model's compiled Thompson draws and output
    kernels), then wait for both."""
    with Client(url) as client:
        decided = client.decide(name, context=task.contexts[0].tolist())
        client.reward(name, decided.event_id, 0.0)
    deadline = time.monotonic() + 1800
    for field in ("decide_step", "output_step"):
        while raw.get(f"/v1/models/{name}").json()[field] != "compiled":
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: its {field} was not compiled within 30 minutes")
            time.sleep(1.0)
    print(f"  {name}: Thompson draws of one row and output steps compiled", flush=True)


# -- single-call latency -------------------------------------------------------------------------


def p50s(
    url: str, task: data.Task, seconds: int, work: Path, models: list[str]
) -> dict[str, float]:
    """wrk c=1 p50 of /decide (each model) and of the no-op with two bodies, interleaved."""
    rows = ag.block_rows(task.contexts[0], task.n_arms).tolist()
    bodies = {
        m: {"context": task.contexts[0].tolist()} if m in ARMS else {"actions": rows}
        for m in models
    }
    noops = {"no-op (16 numbers)": {"x": [ROW]}, "no-op (the decide's 7 x 70)": {"x": rows}}
    out: dict[str, float] = {}
    for label, body in noops.items():
        before = _wrk(f"{url}/bench/noop", body, 1, seconds, work)["p50_ms"]
        for model in models:
            decide = _wrk(f"{url}/v1/models/tp-{model}/decide", bodies[model], 1, seconds, work)
            after = _wrk(f"{url}/bench/noop", body, 1, seconds, work)["p50_ms"]
            ref = math.sqrt(before * after)
            out[f"{model} /decide p50 ms"] = decide["p50_ms"]
            out[f"{label} p50 ms (around {model})"] = ref
            out[f"{model} /decide p50 / {label}"] = decide["p50_ms"] / ref
            before = after
    return out


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[1, 10, 100, 400])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--p50-seconds", type=int, default=3, help="0: no wrk latency cases")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/bandits"))
    p.add_argument(
        "--kernels",
        type=Path,
        default=None,
        help="serve with POSTSERVE_COMPILE_STEPS, kernels kept in this directory\n"
        "(the cases start once every model steps with its compiled kernel)",
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data.fetch()
    task = data.load("shuttle", 0, CONTEXTS)
    vw_error = vw_available()
    report: dict[str, Any] = {"vw_error": vw_error, "pinned": _can_pin(), "cases": []}
    if vw_error is None:
        report["vw before"] = vw_rate(task)
    work = Path(tempfile.mkdtemp(prefix="postserve-bandit-tp-"))
    env = {"POSTSERVE_STORE": "memory"}
    if args.kernels is not None:
        env.update(POSTSERVE_COMPILE_STEPS="1", POSTSERVE_KERNEL_DIR=str(args.kernels.resolve()))
    server = bench_server(work, env)
    url = server.start(timeout=60)
    report["compiled steps"] = args.kernels is not None
    try:
        with Client(url) as client:
            for model in args.models:
                client.create_model(_spec(model, task))
        if args.kernels is not None:
            with httpx.Client(base_url=url, timeout=30) as raw:
                _wait_compiled(raw, [f"tp-{m}" for m in args.models if m not in ARMS])
                # arms as outputs: rewards observe one output, by its own compiled step (built
                # at the first such reward); the model's full step is never used
                for m in (m for m in args.models if m in ARMS):
                    _wait_output_steps(raw, url, f"tp-{m}", task)
        for model in args.models:
            for items in args.items:
                for clients in args.clients:
                    r = batch_rate(url, server.pid, f"tp-{model}", items, clients, args.seconds)
                    report["cases"].append(
                        {"model": model, "items": items, "clients": clients, **r}
                    )
                    print(f"{model} B={items} P={clients}: {r['rate']:.0f} decisions/s, server "
                          f"{r['server_cpu_ms']:.3f} ms, clients {r['client_cpu_ms']:.3f} ms CPU "
                          "per decision", flush=True)  # fmt: skip
        if args.p50_seconds and shutil.which("wrk"):
            report["latency"] = p50s(url, task, args.p50_seconds, work, args.models)
    finally:
        server.stop(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    if vw_error is None:
        report["vw after"] = vw_rate(task)
    text = markdown(report)
    (args.out / "throughput_batches.json").write_text(json.dumps(report, indent=2))
    (args.out / "throughput_batches.md").write_text(text)
    print(text)


def markdown(report: dict[str, Any]) -> str:
    vw = [report[k] for k in ("vw before", "vw after") if k in report]
    ref = math.sqrt(vw[0] * vw[-1]) if vw else math.nan
    lines = [
        "# Bandit throughput through the batch routes (Shuttle models)",
        "",
        f"VW cb_explore_adf in process: {' then '.join(f'{v:.0f}' for v in vw) or 'n/a'} "
        f"predict + learn / s (reference: their geometric mean, {ref:.0f}). Server and clients "
        f"{'pinned to CPU 0 and 1' if report['pinned'] else 'not pinned'}. Steps: "
        f"{'compiled (POSTSERVE_COMPILE_STEPS)' if report.get('compiled steps') else 'eager'}.",
        "",
        "| model | items per request | client processes | decide + reward / s | vs VW "
        "| server CPU ms / decision | client CPU ms / decision | decide ms / item "
        "| reward ms / item |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        lines.append(
            f"| {c['model']} | {c['items']} | {c['clients']} | {c['rate']:.0f} | "
            f"{c['rate'] / ref:.2f} | {c['server_cpu_ms']:.3f} | {c['client_cpu_ms']:.3f} | "
            f"{c['decide_ms']:.3f} | {c['reward_ms']:.3f} |"
        )
    if "latency" in report:
        lines += ["", "| single call (wrk, c=1) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3g} |" for k, v in report["latency"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
