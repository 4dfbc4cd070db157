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
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.http.bench_http import MODELS, ROW, _wrk, bench_server
from service.testing import RedisServer

SPEC = {"name": "m", **MODELS["linear16-kalman"]}
BODY = {"x": [ROW], "y": [0.5]}


@contextmanager
def _redis(work: Path, appendfsync: str) -> Iterator[str]:
    folder = Path(tempfile.mkdtemp(prefix=f"redis-{appendfsync}-", dir=work))
    with RedisServer(folder, appendfsync) as redis:
        yield redis.url


@contextmanager
def _server(work: Path, env: dict[str, str]) -> Iterator[str]:
    server = bench_server(Path(tempfile.mkdtemp(prefix="server-", dir=work)), env)
    base = server.start()
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            client.post("/v1/models", json=SPEC).raise_for_status()
        yield base
    finally:
        server.stop(timeout=30)
        sys.stderr.write(server.log_text())  # what the server said (at warning level)


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
