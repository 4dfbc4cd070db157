"""Many small models in one process: memory per model, creation, restore, listing, metrics.

One real server (``python -m service``-equivalent uvicorn app of ``benchmarks/http/app.py``) on
the chosen store; N models of one kind are created over HTTP (8 concurrent clients), each then
gets ``--updates`` one-row updates; the server's resident memory (``VmRSS``) is read before the
first model and after the last update, so the overhead per model is

    (RSS after - RSS before) / N - state bytes per model

(what the process holds for a model beyond its posterior: the spec, the hosted record, its
calibration window and influence log, the store's bookkeeping). Then ``GET /v1/models`` (all N,
and one page of 100), ``GET /v1/models/{name}`` and ``/metrics`` are timed (median of 5), the
server is stopped (SIGTERM) and started on the same data, and the time until ``/readyz`` answers
ready is the restore time (every model from its snapshot plus the log after it). A model's
version after the restart is checked against the updates sent.

Kinds: ``kalman`` (``Linear(16)``, exact Kalman, 17 parameters, float64) and ``lofi`` (MLP
16-48-1, 865 parameters, LoFi rank 10, float32).

    python -m benchmarks.many_models --models 10000 --kind kalman lofi --store sqlite redis
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.http.bench_http import bench_server
from service.testing.redis import RedisServer

KINDS: dict[str, dict[str, Any]] = {
    "kalman": {
        "network": {"type": "linear", "input_dim": 16, "output_dim": 1},
        "likelihood": {"type": "gaussian", "noise_variance": 1.0},
        "filter": {"type": "kalman"},
        "dtype": "float64",
    },
    "lofi": {
        "network": {"type": "mlp", "input_dim": 16, "hidden": [48], "output_dim": 1},
        "likelihood": {"type": "gaussian", "noise_variance": 1.0},
        "filter": {"type": "lofi", "rank": 10},
        "dtype": "float32",
    },
}
ROW = [0.1 * (i % 5) - 0.2 for i in range(16)]
CLIENTS = 8


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _median_ms(client: httpx.Client, path: str, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.get(path).raise_for_status()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _each(url: str, names: list[str], fn: Any) -> None:
    """``fn(client, name)`` for every name, over CLIENTS concurrent connections."""
    chunks = [names[i::CLIENTS] for i in range(CLIENTS)]

    def work(chunk: list[str]) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for name in chunk:
                fn(c, name)

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(work, chunks))


def run(kind: str, store: str, n: int, updates: int, work: Path) -> dict[str, Any]:
    env = {"POSTSERVE_STORE": store, "POSTSERVE_SNAPSHOT_EVERY": "1000000"}
    with contextlib.ExitStack() as stack:
        if store == "redis":
            redis = stack.enter_context(RedisServer(work / f"redis-{kind}", "everysec"))
            env["POSTSERVE_REDIS_URL"] = redis.url
        server = bench_server(Path(tempfile.mkdtemp(prefix="server-", dir=work)), env)
        server.start()
        stack.callback(server.stop, 60)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            before = _rss_kib(server.pid)
            names = [f"{kind}-{i:05d}" for i in range(n)]
            spec = KINDS[kind]

            def create(client: httpx.Client, name: str) -> None:
                client.post("/v1/models", json={"name": name, **spec}).raise_for_status()

            def update(client: httpx.Client, name: str) -> None:
                for _ in range(updates):
                    body = {"x": [ROW], "y": [0.5]}
                    client.post(f"/v1/models/{name}/update", json=body).raise_for_status()

            t0 = time.perf_counter()
            _each(server.url, names, create)
            created_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            _each(server.url, names, update)
            updated_s = time.perf_counter() - t0
            after = _rss_kib(server.pid)
            info = c.get(f"/v1/models/{names[-1]}").json()
            state_bytes = int(info["state_bytes"])
            listed = c.get("/v1/models").json()["models"]
            assert len(listed) == n, len(listed)
            timings = {
                "list_all_ms": _median_ms(c, "/v1/models"),
                "list_page_ms": _median_ms(c, "/v1/models?limit=100"),
                "get_ms": _median_ms(c, f"/v1/models/{names[n // 2]}"),
                "metrics_ms": _median_ms(c, "/metrics"),
            }
        server.stop(timeout=120)
        t0 = time.perf_counter()
        server.start(timeout=3600)
        restore_s = time.perf_counter() - t0
        with httpx.Client(base_url=server.url, timeout=60) as c:
            versions = {c.get(f"/v1/models/{m}").json()["version"] for m in (names[0], names[-1])}
            assert versions == {updates}, versions
            restored_rss = _rss_kib(server.pid)
    per_model = (after - before) * 1024 / n
    return {
        "kind": kind,
        "store": store,
        "models": n,
        "state_bytes": state_bytes,
        "rss_per_model_bytes": per_model,
        "overhead_per_model_bytes": per_model - state_bytes,
        "create_per_s": n / created_s,
        "updates_per_s": n * updates / updated_s,
        "restore_s": restore_s,
        "rss_after_restore_mib": restored_rss / 1024,
        **timings,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", type=int, default=10_000)
    p.add_argument("--kind", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--store", nargs="+", default=["sqlite", "redis"], choices=["sqlite", "redis"])
    p.add_argument("--updates", type=int, default=2, help="one-row updates per model")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="many-models-") as tmp:
        for kind in args.kind:
            for store in args.store:
                r = run(kind, store, args.models, args.updates, Path(tmp))
                rows.append(r)
                print(r, flush=True)
    print(
        "\n| kind | store | models | state bytes | RSS per model | overhead per model | "
        "creates/s | updates/s | restore s | GET /v1/models (all) ms | one page of 100 ms | "
        "GET one ms | /metrics ms |"
    )
    print("|---" * 13 + "|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['store']} | {r['models']:,} | {r['state_bytes']:,} | "
            f"{r['rss_per_model_bytes']:,.0f} | {r['overhead_per_model_bytes']:,.0f} | "
            f"{r['create_per_s']:,.0f} | {r['updates_per_s']:,.0f} | {r['restore_s']:.1f} | "
            f"{r['list_all_ms']:.0f} | {r['list_page_ms']:.1f} | {r['get_ms']:.1f} | "
            f"{r['metrics_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
