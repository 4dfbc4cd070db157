"""/update throughput and latency by store, as ratios to the memory store, in one run.

For each store a fresh server (one uvicorn worker, pinned like ``bench_http``) hosts a linear
model with 16 inputs and the exact Kalman filter; wrk posts one-row updates at concurrency 1 and
32. Redis runs as its own ``redis-server`` on a free port with AOF on, once with
``appendfsync everysec`` and once with ``always``; SQLite commits with ``synchronous=FULL``.
Every acknowledged update is durable to the store's guarantee, so the ratios are the price of
that guarantee on this machine.

    apt-get install wrk redis-server
    python -m benchmarks.http.bench_stores --out benchmarks/out/http
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.http.bench_http import ROW, SERVER_CPU, _free_port, _pin, _wrk

SPEC = {
    "name": "m",
    "network": {"type": "linear", "input_dim": 16, "output_dim": 1},
    "likelihood": {"type": "gaussian", "noise_variance": 1.0},
    "filter": {"type": "kalman"},
}
BODY = {"x": [ROW], "y": [0.5]}


@contextmanager
def _redis(work: Path, appendfsync: str) -> Iterator[str]:
    port = _free_port()
    folder = Path(tempfile.mkdtemp(prefix=f"redis-{appendfsync}-", dir=work))
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
         "--save", "", "--appendonly", "yes", "--appendfsync", appendfsync],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def _server(work: Path, env: dict[str, str]) -> Iterator[str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "benchmarks.http.app:app"]
    cmd += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    full_env = {
        **os.environ,
        "POSTSERVE_DATA_DIR": str(work / f"data-{port}"),
        "POSTSERVE_THREADS": "1",
        "POSTSERVE_SNAPSHOT_EVERY": "1000000",
        "POSTSERVE_SNAPSHOT_INTERVAL_S": "3600",
        "POSTSERVE_LOG_LEVEL": "warning",
        **env,
    }
    proc = subprocess.Popen([*_pin(SERVER_CPU), *cmd], env=full_env)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            for _ in range(300):
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            client.post("/v1/models", json=SPEC).raise_for_status()
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/http"))
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install {tool}")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="postserve-stores-"))
    results: dict[str, dict[str, Any]] = {}
    configs: list[tuple[str, dict[str, str], str | None]] = [
        ("memory", {"POSTSERVE_STORE": "memory"}, None),
        ("sqlite (synchronous=FULL)", {"POSTSERVE_STORE": "sqlite"}, None),
        ("redis appendfsync everysec", {"POSTSERVE_STORE": "redis"}, "everysec"),
        ("redis appendfsync always", {"POSTSERVE_STORE": "redis"}, "always"),
    ]
    try:
        for label, env, fsync in configs:
            with _redis(work, fsync or "no") as url:
                server_env = {**env, "POSTSERVE_REDIS_URL": url}
                with _server(work, server_env) as base:
                    for conns in (1, 32):
                        _wrk(base + "/v1/models/m/update", BODY, conns, 1, work)  # warm-up
                        r = _wrk(base + "/v1/models/m/update", BODY, conns, args.seconds, work)
                        results[f"{label} c={conns}"] = r
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = ["| store | c | updates/s | p50 ms | p99 ms | updates/s vs memory | p50 vs memory |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in results.items():
        label, conns = key.rsplit(" c=", 1)
        mem = results[f"memory c={conns}"]
        rows.append(
            f"| {label} | {conns} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['rps'] / mem['rps']:.2f} | {r['p50_ms'] / mem['p50_ms']:.2f} |"
        )
    table = "\n".join(rows)
    print(table)
    (args.out / "stores.md").write_text(table + "\n")
    (args.out / "stores.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
