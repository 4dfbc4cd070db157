"""Durable /update throughput and latency by store, as ratios to the no-op route, in one run.

One server per store (one uvicorn worker each, all pinned to the same CPU like ``bench_http``;
the idle ones cost nothing) hosts a linear model with 16 inputs and the exact Kalman filter; wrk
posts one-row updates to that one model at concurrency 1 and 32. Redis runs as its own
``redis-server`` on a free port with AOF on, once with ``appendfsync everysec`` and once with
``always``; SQLite commits with ``synchronous=FULL``. Every acknowledged update is durable to the
store's guarantee, so the ratios are the price of that guarantee on this machine.

At each concurrency the runs go no-op, memory, no-op, sqlite, no-op, redis everysec, no-op,
redis always, no-op (the no-op route of ``benchmarks/http/app.py``, on the memory store's
server), each store's updates measured between two no-ops; its ratios are to the geometric mean
of those two, so the machine's drift cancels. ``vs memory`` divides a store's ratio by the memory
store's: what durability costs beyond the engine's own work. ``--rounds N`` repeats the whole
sequence and reports each figure's median over the rounds. ``server CPU ms/update`` is the
Postserve process's CPU time (all its threads; not redis-server's) per update answered.

Checks: every answer was 200, and each model's final version equals the updates sent (warm-ups
included; requests in flight when wrk stops are applied, not answered).

    apt-get install wrk redis-server
    python -m benchmarks.http.bench_stores --out benchmarks/out/http [--seconds 3] [--rounds 1] \\
        [--kernels /tmp/postserve-kernels]   # with compiled steps
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from benchmarks.http.bench_http import (
    MODELS,
    ROW,
    _geomean,
    _settle,
    _version,
    _wait_compiled,
    _wrk,
    bench_server,
)
from service.testing import RedisServer, Server

SPEC = {"name": "m", **MODELS["linear16-kalman"]}
UPDATE = ("/v1/models/m/update", {"x": [ROW], "y": [0.5]})
NOOP = ("/bench/noop", {"x": [ROW]})
CONFIGS: list[tuple[str, str, str | None]] = [  # label, POSTSERVE_STORE, redis appendfsync
    ("memory", "memory", None),
    ("sqlite (synchronous=FULL)", "sqlite", None),
    ("redis appendfsync everysec", "redis", "everysec"),
    ("redis appendfsync always", "redis", "always"),
]
FIGURES = ("rps", "p50_ms", "p99_ms", "rps_vs_noop", "p50_vs_noop", "cpu_ms")


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(
    stack: ExitStack,
    work: Path,
    label: str,
    store: str,
    fsync: str | None,
    kernels: Path | None = None,
) -> Server:
    env = {"POSTSERVE_STORE": store}
    if kernels is not None:
        env.update(POSTSERVE_COMPILE_STEPS="1", POSTSERVE_KERNEL_DIR=str(kernels.resolve()))
    if fsync is not None:
        folder = Path(tempfile.mkdtemp(prefix=f"redis-{fsync}-", dir=work))
        redis = stack.enter_context(RedisServer(folder, fsync))
        env["POSTSERVE_REDIS_URL"] = redis.url
    server = bench_server(Path(tempfile.mkdtemp(prefix="server-", dir=work)), env)
    server.start()

    def stop() -> None:
        server.stop(timeout=30)
        sys.stderr.write(server.log_text())  # what the server said (at warning level)

    stack.callback(stop)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        client.post("/v1/models", json=SPEC).raise_for_status()
        if kernels is not None:
            _wait_compiled(client, ["m"])
    return server


def _round(
    servers: dict[str, Server], conns: int, seconds: int, work: Path, sent: dict[str, int]
) -> tuple[dict[str, dict[str, float]], int]:
    """no-op, store, no-op, store, ..., no-op at one concurrency: each store's figures."""
    noop_url = servers["memory"].url + NOOP[0]
    bad = 0
    noop = _wrk(noop_url, NOOP[1], conns, seconds, work)
    out: dict[str, dict[str, float]] = {}
    for label, server in servers.items():
        warm = _wrk(server.url + UPDATE[0], UPDATE[1], conns, 1, work)
        cpu0 = _cpu_s(server.pid)
        r = _wrk(server.url + UPDATE[0], UPDATE[1], conns, seconds, work)
        cpu = _cpu_s(server.pid) - cpu0
        sent[label] += warm["sent"] + r["sent"]
        with httpx.Client(base_url=server.url, timeout=30) as client:
            _settle(client, "m", sent[label])
        after = _wrk(noop_url, NOOP[1], conns, seconds, work)
        bad += sum(x["status_other"] for x in (noop, warm, r, after))
        ref_rps, ref_p50 = (
            _geomean(noop["rps"], after["rps"]),
            _geomean(noop["p50_ms"], after["p50_ms"]),
        )
        out[label] = {
            "rps": r["rps"],
            "p50_ms": r["p50_ms"],
            "p99_ms": r["p99_ms"],
            "noop_rps": ref_rps,
            "noop_p50_ms": ref_p50,
            "rps_vs_noop": r["rps"] / ref_rps,
            "p50_vs_noop": r["p50_ms"] / ref_p50,
            "cpu_ms": 1000 * cpu / max(1, r["answered"]),
        }
        print(
            f"  [c={conns}] {label}: {r['rps']:.0f} updates/s ({r['rps'] / ref_rps:.2f} of no-op), "
            f"p50 {r['p50_ms']:.2f} ms ({r['p50_ms'] / ref_p50:.2f} of no-op), "
            f"{out[label]['cpu_ms']:.2f} server CPU ms/update",
            flush=True,
        )
        noop = after
    return out, bad


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/http"))
    parser.add_argument("--seconds", type=int, default=3, help="measured seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=1, help="repeats; medians are reported")
    parser.add_argument(
        "--kernels",
        type=Path,
        default=None,
        help="serve with POSTSERVE_COMPILE_STEPS, kernels kept in this directory",
    )
    args = parser.parse_args()
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install {tool}")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="postserve-stores-"))
    rounds: dict[int, list[dict[str, dict[str, float]]]] = {1: [], 32: []}
    checks: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        with ExitStack() as stack:
            servers = {
                label: _start(stack, work, label, s, f, args.kernels) for label, s, f in CONFIGS
            }
            sent = dict.fromkeys(servers, 0)
            bad = 0
            for _ in range(args.rounds):
                for conns in rounds:
                    figures, n_bad = _round(servers, conns, args.seconds, work, sent)
                    rounds[conns].append(figures)
                    bad += n_bad
            for label, server in servers.items():
                with httpx.Client(base_url=server.url, timeout=30) as client:
                    final = _version(client, "m")
                checks[f"{label}: final version == updates sent"] = final == sent[label]
            checks["all answers 200"] = bad == 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results: dict[str, dict[str, Any]] = {}
    for conns, per_round in rounds.items():
        for label, _, _ in CONFIGS:
            med = {k: statistics.median(r[label][k] for r in per_round) for k in FIGURES}
            mem = statistics.median(r["memory"]["rps_vs_noop"] for r in per_round)
            med["rps_vs_memory"] = statistics.median(
                r[label]["rps_vs_noop"] / r["memory"]["rps_vs_noop"] for r in per_round
            )
            med["memory_rps_vs_noop"] = mem
            results[f"{label} c={conns}"] = {"median": med, "rounds": [r[label] for r in per_round]}
    table = [
        f"{args.rounds} round(s), {args.seconds} s per wrk run, {time.monotonic() - t0:.0f} s in all; "
        "medians over the rounds",
        "",
        "| store | c | updates/s | p50 ms | p99 ms | updates/s / no-op | p50 / no-op "
        "| updates/s vs memory | server CPU ms/update |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, res in results.items():
        label, conns = key.rsplit(" c=", 1)
        m = res["median"]
        table.append(
            f"| {label} | {conns} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
            f"{m['rps_vs_noop']:.2f} | {m['p50_vs_noop']:.2f} | {m['rps_vs_memory']:.2f} | "
            f"{m['cpu_ms']:.2f} |"
        )
    table += ["", "Checks:", "", *(f"- {k}: {v}" for k, v in checks.items())]
    text = "\n".join(table)
    print(text)
    (args.out / "stores.md").write_text(text + "\n")
    (args.out / "stores.json").write_text(
        json.dumps({"results": results, "checks": checks}, indent=1)
    )
    if not all(checks.values()):
        sys.exit("some checks failed: see above")


if __name__ == "__main__":
    main()
