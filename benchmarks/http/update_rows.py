"""Many-row ``/update`` requests through the real server, against one-row ones and the no-op.

One server (``bench_http.bench_server``: the app plus the no-op route, memory store, one uvicorn
worker, pinned to CPU 0 where it can be) and wrk at concurrency 1 (pinned to CPU 1). For each
``--rows`` R, one model per R (Kalman, ``Linear(16)``, float32, static dynamics: the
``linear16-kalman`` model of ``bench_http``) takes ``/update`` requests of R rows for
``--seconds``, between no-op runs. Reported per R: the p50 latency of a request, per row, and
against the no-op's p50 (geometric mean of the no-ops either side).

To compare two versions of the code, run it in each checkout (the server runs from the current
directory):

    python -m benchmarks.http.update_rows [--rows 1 100] [--seconds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.http.bench_http import COMMON, MODELS, ROW, _settle, _wrk, bench_server


def _body(rows: int) -> dict[str, Any]:
    """R rows: ROW shifted row by row, so that the rows differ."""
    x = [[v + 0.01 * k for v in ROW] for k in range(rows)]
    return {"x": x, "y": [0.5 - 0.001 * k for k in range(rows)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="postserve-rows-"))
    server = bench_server(work, {"POSTSERVE_STORE": "memory"})
    base = server.start(timeout=60)
    noop = (base + "/bench/noop", {"x": [ROW]})
    report: list[dict[str, Any]] = []
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            before = _wrk(*noop, 1, args.seconds, work)
            for rows in args.rows:
                name = f"kalman-{rows}"
                spec = {"name": name, **COMMON, **MODELS["linear16-kalman"]}
                client.post("/v1/models", json=spec).raise_for_status()
                url = f"{base}/v1/models/{name}/update"
                _wrk(url, _body(rows), 1, 1, work)  # warm-up
                _settle(client, None, None)
                r = _wrk(url, _body(rows), 1, args.seconds, work)
                _settle(client, None, None)
                after = _wrk(*noop, 1, args.seconds, work)
                ref = math.sqrt(before["p50_ms"] * after["p50_ms"])
                row = {
                    "rows": rows,
                    "p50_ms": r["p50_ms"],
                    "p50_ms_a_row": r["p50_ms"] / rows,
                    "noop_p50_ms": ref,
                    "p50_vs_noop": r["p50_ms"] / ref,
                    "rps": r["rps"],
                    "all_200": r["status_other"] == 0,
                }
                report.append(row)
                print(json.dumps(row), flush=True)
                before = after
    finally:
        server.stop(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
