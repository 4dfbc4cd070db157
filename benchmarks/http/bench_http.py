"""HTTP latency and throughput of /update and /predict against a no-op route on the same server.

One uvicorn worker (pinned to CPU 0 when taskset exists and CPUs 0 and 1 are ours) serves the real
app, ``create_app(settings)``, plus ``POST /bench/noop`` (a pydantic body of 16 floats, ``{"ok":
true}`` back; see ``benchmarks/http/app.py``). wrk (pinned to CPU 1) drives each route for a fixed
time at each concurrency, one row per request, after a short warm-up. Every figure is reported next
to the no-op's from the same run: at each concurrency the no-op runs before the first case and
after every case, and each case's ratios use the geometric mean of the two no-ops either side of
it, so slow drift of the machine cancels. On this noisy machine only those ratios mean anything.

A wrk Lua script counts the requests it sends and the answers by status, so the run checks that
every answer was 200 and that each model's final version equals the number of updates sent
(warm-ups included; requests still in flight when wrk stops are sent and applied, not answered).

    apt-get install wrk            # the load generator
    python -m benchmarks.http.bench_http --out benchmarks/out/http [--store memory|sqlite|both] \\
        [--kernels /tmp/postserve-kernels]   # with compiled steps
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from service.testing import Server

MODELS: dict[str, dict[str, Any]] = {
    "linear16-kalman": {  # 16 -> 1 with bias: 17 parameters, exact Kalman filter
        "network": {"type": "linear", "input_dim": 16, "output_dim": 1},
        "likelihood": {"type": "gaussian", "noise_variance": 1.0},
        "filter": {"type": "kalman"},
    },
    "linear16-lofi": {  # the same model with a LoFi rank-10 posterior
        "network": {"type": "linear", "input_dim": 16, "output_dim": 1},
        "likelihood": {"type": "gaussian", "noise_variance": 1.0},
        "filter": {"type": "lofi", "rank": 10},
    },
    "mlp10k-lofi": {  # 16 -> 128 -> 64 -> 1: 10,497 parameters, LoFi rank 10
        "network": {"type": "mlp", "input_dim": 16, "hidden": [128, 64], "output_dim": 1},
        "likelihood": {"type": "gaussian", "noise_variance": 1.0},
        "filter": {"type": "lofi", "rank": 10},
        "prior": {"variance": 0.1},
    },
}
COMMON = {"dtype": "float32", "dynamics": {"process_noise": 0.0, "decay": 1.0}}
ROW = [round(0.1 * (i % 7) - 0.3, 2) for i in range(16)]
SERVER_CPU, LOAD_CPU = 0, 1
#: the server: one uvicorn worker on benchmarks/http/app.py (``--port PORT`` and SERVER_ARGS follow)
UVICORN = (sys.executable, "-m", "uvicorn", "--factory", "benchmarks.http.app:app")
SERVER_ARGS = ("--log-level", "warning", "--no-access-log")
SERVER_ENV = {
    "POSTSERVE_THREADS": "1",
    "POSTSERVE_SNAPSHOT_EVERY": "1000000",  # keep background snapshots out of the timings
    "POSTSERVE_SNAPSHOT_INTERVAL_S": "3600",
    "POSTSERVE_LOG_LEVEL": "warning",
}
Case = tuple[str, str | None, str, dict[str, Any]]  # label, model updated, path, body

# wrk counts sent requests and answers by status per thread; done() sums them over the threads.
LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%s]==]
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) sent = 0; ok = 0; bad = 0; last_bad = 0 end
function request() sent = sent + 1; return wrk.request() end
function response(status, headers, body)
  if status == 200 then ok = ok + 1 else bad = bad + 1; last_bad = status end
end
function done(summary, latency, requests)
  local s, o, b, l = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent"); o = o + t:get("ok"); b = b + t:get("bad")
    if t:get("last_bad") ~= 0 then l = t:get("last_bad") end
  end
  io.write(string.format("BENCH sent=%%d ok=%%d bad=%%d last_bad=%%d\\n", s, o, b, l))
end
"""


def _can_pin() -> bool:
    return shutil.which("taskset") is not None and {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0)


def _pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if _can_pin() else []


def bench_server(workdir: Path, env: dict[str, str]) -> Server:
    """The benchmarks' server (not started): UVICORN, pinned to SERVER_CPU where it can be, run
    from the current directory with this process's environment, SERVER_ENV and ``env``; data
    under ``workdir/data``, its log in ``workdir``."""
    return Server(
        workdir,
        {**SERVER_ENV, **env},
        SERVER_ARGS,
        command=UVICORN,
        prefix=_pin(SERVER_CPU),
        cwd=Path.cwd(),
        inherit_env=True,
    )


def _wrk(url: str, body: dict[str, Any], conns: int, seconds: int, work: Path) -> dict[str, Any]:
    script = work / "post.lua"
    script.write_text(LUA % json.dumps(body))
    cmd = [*_pin(LOAD_CPU), "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    proc = subprocess.run([*cmd, "-s", str(script), url], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    out = proc.stdout
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * unit[m.group(2)] if m else math.nan

    def grab(pattern: str) -> str:
        m = re.search(pattern, out)
        if m is None:
            raise RuntimeError(f"unexpected wrk output:\n{out}")
        return m.group(1)

    counts = dict(re.findall(r"(\w+)=(\d+)", grab(r"BENCH (.*)")))
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(grab(r"Requests/sec:\s+([\d.]+)")),
        "p50_ms": pct("50"),
        "p99_ms": pct("99"),
        "answered": int(grab(r"(\d+) requests in")),
        # wrk calls request() once more in thread 0, before the run, to check the script
        # (script_verify_request): that request is never sent.
        "sent": int(counts["sent"]) - 1,
        "status_200": int(counts["ok"]),
        "status_other": int(counts["bad"]),
        "last_other_status": int(counts["last_bad"]),
        "socket_errors": errors.group(1) if errors else "",
    }


def _version(client: httpx.Client, name: str) -> int:
    r = client.get(f"/v1/models/{name}")
    r.raise_for_status()
    return int(r.json()["version"])


def _settle(client: httpx.Client, name: str | None, want: int | None) -> int | None:
    """Wait for requests still in flight when wrk stopped; return the model's version if named."""
    time.sleep(0.3)
    if name is None:
        return None
    deadline = time.monotonic() + 10
    last = None
    while True:
        v = _version(client, name)
        if v in (want, last) or time.monotonic() > deadline:
            return v
        last = v
        time.sleep(0.2)


def _geomean(a: float, b: float) -> float:
    return math.sqrt(a * b)


def _wait_compiled(client: httpx.Client, names: list[str], timeout: float = 900.0) -> None:
    """Wait until every model steps and predicts one row with its compiled kernels
    (``POSTSERVE_COMPILE_STEPS``; the first one-row /predict asks for the predictive's)."""
    deadline = time.monotonic() + timeout
    for name in names:
        client.post(f"/v1/models/{name}/predict", json={"x": [ROW]}).raise_for_status()
        while True:
            info = client.get(f"/v1/models/{name}").json()
            if info["step"] == info["predict_step"] == "compiled":
                break
            if info["step_error"] is not None or time.monotonic() > deadline:
                sys.exit(f"{name}: no compiled step: {info['step_error']}")
            time.sleep(1.0)
        print(f"  {name}: compiled", flush=True)


def run_store(
    store: str,
    seconds: int,
    warmup: int,
    noop_seconds: int,
    conns_list: list[int],
    kernels: Path | None = None,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="postserve-bench-"))
    env = {"POSTSERVE_STORE": store}
    if kernels is not None:
        env.update(POSTSERVE_COMPILE_STEPS="1", POSTSERVE_KERNEL_DIR=str(kernels.resolve()))
    server = bench_server(work, env)
    t_start = time.monotonic()
    base = server.start(timeout=60)
    results: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    sent_updates = dict.fromkeys(MODELS, 0)
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            models: dict[str, dict[str, Any]] = {}
            for name, spec in MODELS.items():
                r = client.post("/v1/models", json={"name": name, **COMMON, **spec})
                r.raise_for_status()
                info = r.json()
                models[name] = {
                    "num_params": info["num_params"],
                    "state_bytes": info["state_bytes"],
                }
            if kernels is not None:
                _wait_compiled(client, list(MODELS))
            cases: list[Case] = []
            for name in MODELS:
                path = f"/v1/models/{name}"
                cases += [
                    (f"{name} /update", name, f"{path}/update", {"x": [ROW], "y": [0.5]}),
                    (f"{name} /predict", None, f"{path}/predict", {"x": [ROW]}),
                    (
                        f"{name} /predict 10 samples",
                        None,
                        f"{path}/predict",
                        {"x": [ROW], "num_samples": 10, "seed": 1},
                    ),
                ]
            noop: Case = ("no-op", None, "/bench/noop", {"x": [ROW]})

            def measure(case: Case, conns: int, secs: int, warm_s: int) -> dict[str, Any]:
                label, model, path, body = case
                warm = _wrk(base + path, body, conns, warm_s, work) if warm_s else None
                if warm is not None:
                    _settle(client, None, None)
                r = _wrk(base + path, body, conns, secs, work)
                r.update(route=label, conns=conns)
                r["warmup_status_other"] = warm["status_other"] if warm else 0
                if model is not None:
                    sent_updates[model] += (warm["sent"] if warm else 0) + r["sent"]
                    r["version_after"] = _settle(client, model, sent_updates[model])
                    r["updates_sent_so_far"] = sent_updates[model]
                else:
                    _settle(client, None, None)
                print(
                    f"  [{store} c={conns}] {label}: {r['rps']:.0f} req/s, "
                    f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms",
                    flush=True,
                )
                return r

            for conns in conns_list:
                # no-op, case, no-op, case, ..., no-op: each case against the no-ops either side
                noops = [measure(noop, conns, noop_seconds, warmup)]
                block: list[dict[str, Any]] = []
                for case in cases:
                    r = measure(case, conns, seconds, warmup)
                    noops.append(measure(noop, conns, noop_seconds, 0))
                    before, after = noops[-2], noops[-1]
                    ref_rps = _geomean(before["rps"], after["rps"])
                    ref_p50 = _geomean(before["p50_ms"], after["p50_ms"])
                    r["noop_rps"], r["noop_p50_ms"] = ref_rps, ref_p50
                    r["rps_vs_noop"] = r["rps"] / ref_rps
                    r["p50_vs_noop"] = r["p50_ms"] / ref_p50
                    r["p50_minus_noop_ms"] = r["p50_ms"] - ref_p50
                    block.append(r)
                rps = [n["rps"] for n in noops]
                summary = {
                    **{k: statistics.median(n[k] for n in noops) for k in ("rps", "p50_ms")},
                    "p99_ms": statistics.median(n["p99_ms"] for n in noops),
                    "route": f"no-op (median of {len(noops)})",
                    "conns": conns,
                    "rps_vs_noop": 1.0,
                    "p50_vs_noop": 1.0,
                    "p50_minus_noop_ms": 0.0,
                    "status_other": sum(n["status_other"] for n in noops),
                    "warmup_status_other": noops[0]["warmup_status_other"],
                    "socket_errors": ";".join(
                        n["socket_errors"] for n in noops if n["socket_errors"]
                    ),
                    "runs": noops,
                }
                checks[f"no-op req/s spread c={conns} (max/min over the run)"] = max(rps) / min(rps)
                results += [summary, *block]
            for name in MODELS:
                final = _version(client, name)
                checks[f"{name} final version"] = final
                checks[f"{name} updates sent"] = sent_updates[name]
                checks[f"{name} version == updates sent"] = final == sent_updates[name]
    finally:
        server.stop(timeout=60)
    server_log = server.log_text()
    checks["all answers 200 (measured + warm-up)"] = all(
        r["status_other"] == 0 and r["warmup_status_other"] == 0 for r in results
    )
    checks["no socket errors"] = all(not r["socket_errors"] for r in results)
    checks["server log clean"] = not re.search(r"Traceback|ERROR|Exception", server_log)
    # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly: -15 is the normal code
    checks["server stopped cleanly on SIGTERM"] = server.returncode in (0, -15)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "store": store,
        "models": models,
        "results": results,
        "checks": checks,
        "server_log_tail": server_log[-2000:],
        "wall_s": time.monotonic() - t_start,
    }


def _meta(seconds: int, warmup: int, noop_seconds: int) -> dict[str, Any]:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip() or None,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "pinning": (
            f"taskset: server on CPU {SERVER_CPU}, wrk on CPU {LOAD_CPU}"
            if _can_pin()
            else "not pinned (taskset missing or CPUs 0/1 not available)"
        ),
        "load_generator": (wrk_v[0] if wrk_v else "wrk") + ", 1 thread",
        "uvicorn": version("uvicorn"),
        "uvicorn_http": "httptools" if version("httptools") else "h11 (pure Python)",
        "uvicorn_loop": "uvloop" if version("uvloop") else "asyncio",
        "fastapi": version("fastapi"),
        "pydantic": version("pydantic"),
        "torch": version("torch"),
        "seconds_per_case": seconds,
        "noop_seconds": noop_seconds,
        "warmup_s": warmup,
        "body": "one row of 16 floats; /update adds y = [0.5]; no request_id",
    }


def _table(run: dict[str, Any]) -> str:
    rows = [
        "| route | c | req/s | p50 ms | p99 ms | req/s / no-op | p50 / no-op "
        "| p50 - no-op (ms) | non-200 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in run["results"]:
        rows.append(
            f"| {r['route']} | {r['conns']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['rps_vs_noop']:.2f} | {r['p50_vs_noop']:.2f} | "
            f"{r['p50_minus_noop_ms']:+.2f} | {r['status_other'] + r['warmup_status_other']} |"
        )
    return "\n".join(rows)


def _report(run: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"# HTTP benchmark, store `{run['store']}`",
        "",
        f"{meta['date']}, commit {meta['commit']}; {meta['pinning']}; load generator "
        f"{meta['load_generator']}; uvicorn {meta['uvicorn']} ({meta['uvicorn_http']}, "
        f"{meta['uvicorn_loop']}), one worker, POSTSERVE_THREADS=1; {meta['seconds_per_case']} s "
        f"per case after a {meta['warmup_s']} s warm-up; {meta['body']}.",
        "",
        "Models: "
        + "; ".join(
            f"{n} ({m['num_params']} parameters, state {m['state_bytes']} bytes)"
            for n, m in run["models"].items()
        )
        + ".",
        "",
        "Each case is measured between two no-op runs at the same concurrency (a "
        f"{meta['noop_seconds']} s no-op after every case); its ratios are to the geometric mean of "
        "those two, so slow drift of the machine cancels. The no-op row is the median of them.",
        "",
        _table(run),
        "",
        "Checks:",
        "",
        *(
            f"- {k}: {v:.2f}" if isinstance(v, float) else f"- {k}: {v}"
            for k, v in run["checks"].items()
        ),
        f"- wall time of this store's run: {run['wall_s']:.0f} s",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/http"))
    parser.add_argument("--store", choices=["memory", "sqlite", "both"], default="memory")
    parser.add_argument("--seconds", type=int, default=5, help="measured seconds per case")
    parser.add_argument(
        "--warmup", type=int, default=1, help="warm-up seconds per case (wrk takes whole seconds)"
    )
    parser.add_argument(
        "--noop-seconds", type=int, default=2, help="seconds of each no-op between the cases"
    )
    parser.add_argument("--conns", default="1,32", help="comma-separated concurrencies")
    parser.add_argument(
        "--kernels",
        type=Path,
        default=None,
        help="serve with POSTSERVE_COMPILE_STEPS, kernels kept in this directory; the cases "
        "start once every model steps with its compiled kernel",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    args.out.mkdir(parents=True, exist_ok=True)
    conns = [int(c) for c in args.conns.split(",")]
    meta = _meta(args.seconds, args.warmup, args.noop_seconds)
    stores = ["memory", "sqlite"] if args.store == "both" else [args.store]
    failed = False
    for store in stores:
        print(f"store {store}: {meta['pinning']}; {meta['load_generator']}", flush=True)
        run = run_store(store, args.seconds, args.warmup, args.noop_seconds, conns, args.kernels)
        report = _report(run, meta)
        print(report)
        (args.out / f"http_{store}.md").write_text(report)
        (args.out / f"http_{store}.json").write_text(json.dumps({"meta": meta, **run}, indent=1))
        failed |= not all(v for k, v in run["checks"].items() if isinstance(v, bool))
    if failed:
        sys.exit("some checks failed: see the report")


if __name__ == "__main__":
    main()
