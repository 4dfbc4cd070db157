"""HTTP latency and throughput of /update and /predict against a no-op route on the same server.

One uvicorn worker (pinned to CPU 0 when taskset exists) serves the real app plus ``POST
/bench/noop`` (a pydantic body, ``{"ok": true}`` back); wrk (pinned to CPU 1) drives each route for
a fixed time at concurrency 1 and 32, one row per request. Every figure is reported next to the
no-op's from the same run: on this noisy machine only those ratios mean anything.

    apt-get install wrk            # the load generator
    python -m benchmarks.http.bench_http --out benchmarks/out/http [--store memory|sqlite]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

MODELS: dict[str, dict[str, Any]] = {
    "linear16": {
        "network": {"type": "linear", "input_dim": 16, "output_dim": 1},
        "likelihood": {"type": "gaussian", "noise_variance": 1.0},
        "filter": {"type": "kalman"},
    },
    "mlp10k": {  # 16 -> 128 -> 64 -> 1: 10,497 parameters
        "network": {"type": "mlp", "input_dim": 16, "hidden": [128, 64], "output_dim": 1},
        "likelihood": {"type": "gaussian", "noise_variance": 1.0},
        "filter": {"type": "lofi", "rank": 10},
        "prior": {"variance": 0.1},
    },
}
ROW = [round(0.1 * (i % 7) - 0.3, 2) for i in range(16)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and os.cpu_count() else []


def _wrk(
    url: str, body: dict[str, Any], conns: int, seconds: int, workdir: Path
) -> dict[str, float]:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{json.dumps(body)}]]\n"
    )
    out = subprocess.run(
        [
            *_pin(1),
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * unit[m.group(2)] if m else float("nan")

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50_ms": pct("50"),
        "p99_ms": pct("99"),
        "requests": total,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/http"))
    parser.add_argument("--store", choices=["memory", "sqlite"], default="memory")
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="postserve-bench-"))
    port = _free_port()
    env = {
        **os.environ,
        "POSTSERVE_STORE": args.store,
        "POSTSERVE_DATA_DIR": str(work / "data"),
        "POSTSERVE_THREADS": "1",
        "POSTSERVE_SNAPSHOT_EVERY": "100000",
        "POSTSERVE_LOG_LEVEL": "warning",
    }
    log = (work / "server.log").open("w")
    server = subprocess.Popen(
        [
            *_pin(0),
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "benchmarks.http.app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            for _ in range(300):
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            for name, spec in MODELS.items():
                client.post("/v1/models", json={"name": name, **spec}).raise_for_status()
            cases: list[tuple[str, str, dict[str, Any]]] = [("noop", "/bench/noop", {"x": [ROW]})]
            for name in MODELS:
                cases += [
                    (f"{name} update", f"/v1/models/{name}/update", {"x": [ROW], "y": [0.5]}),
                    (f"{name} predict", f"/v1/models/{name}/predict", {"x": [ROW]}),
                    (
                        f"{name} predict+10 samples",
                        f"/v1/models/{name}/predict",
                        {"x": [ROW], "num_samples": 10, "seed": 1},
                    ),
                ]
            results: dict[str, dict[str, Any]] = {}

            def version(name: str) -> int:
                return int(client.get(f"/v1/models/{name}").json()["version"])

            for conns in (1, 32):
                for label, path, body in cases:
                    _wrk(base + path, body, conns, 1, work)  # warm-up
                    model = label.split()[0]
                    before = version(model) if "update" in label else 0
                    r = _wrk(base + path, body, conns, args.seconds, work)
                    if "update" in label:
                        r["applied"] = version(model) - before
                    results[f"{label} c={conns}"] = r
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    rows = [
        "| route | c | req/s | p50 ms | p99 ms | req/s vs no-op | p50 vs no-op | non-2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        label, conns = key.rsplit(" c=", 1)
        noop = results[f"noop c={conns}"]
        rows.append(
            f"| {label} | {conns} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['rps'] / noop['rps']:.2f} | {r['p50_ms'] / noop['p50_ms']:.2f} | {r['non_2xx']} |"
        )
    table = "\n".join(rows)
    check = "; ".join(
        f"{k}: {r['applied']} applied, {r['requests']} answered to wrk"
        for k, r in results.items()
        if "applied" in r
    )
    print(
        f"store {args.store}; server on CPU 0, wrk on CPU 1 ({'taskset' if _pin(0) else 'not pinned'})"
    )
    print(table)
    print("version check (requests in flight when wrk stops are applied, not counted):", check)
    (args.out / f"http_{args.store}.md").write_text(table + "\n\n" + check + "\n")
    (args.out / f"http_{args.store}.json").write_text(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
