"""Does the largest allowed /predict stall other requests? /healthz latency while it runs.

A real server (default limits, memory store) hosts a 16-input linear model; one client thread
posts the largest /predict the limits allow (``POSTSERVE_MAX_ROWS`` rows and as many samples as
``POSTSERVE_MAX_ANSWER_NUMBERS`` leaves), again and again for ``--seconds``, while another polls
``GET /healthz`` every 10 ms. Prints the predict's size and duration and the /healthz p50, p99 and
maximum (the target: p99 under 100 ms), next to /healthz alone on the idle server in the same run.

    python -m benchmarks.http.stall [--seconds 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from service.config import Settings
from service.testing import Server, linear_spec


def _poll(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=30.0) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            c.get(f"{url}/healthz").raise_for_status()
            out.append(time.perf_counter() - t0)
            time.sleep(0.01)


def _summary(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=100)
    return f"n={len(xs)}  p50 {q[49] * 1e3:.1f} ms  p99 {q[98] * 1e3:.1f} ms  max {max(xs) * 1e3:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    limits = Settings()
    rows = limits.max_rows
    samples = min(limits.max_samples, limits.max_answer_numbers // rows - 4)
    with tempfile.TemporaryDirectory() as work:
        server = Server(Path(work), env={"POSTSERVE_STORE": "memory"})
        server.start()
        try:
            with httpx.Client(base_url=server.url, timeout=300.0) as c:
                c.post("/v1/models", json=linear_spec("m", 16)).raise_for_status()
                idle: list[float] = []
                stop = threading.Event()
                poller = threading.Thread(target=_poll, args=(server.url, stop, idle))
                poller.start()
                time.sleep(2.0)
                stop.set()
                poller.join()
                busy: list[float] = []
                stop = threading.Event()
                poller = threading.Thread(target=_poll, args=(server.url, stop, busy))
                body = {"x": [[0.01 * (i % 17)] * 16 for i in range(rows)], "num_samples": samples}
                took: list[float] = []
                poller.start()
                deadline = time.monotonic() + args.seconds
                while time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    r = c.post("/v1/models/m/predict", json=body)
                    r.raise_for_status()
                    took.append(time.perf_counter() - t0)
                stop.set()
                poller.join()
                size = len(r.content)
        finally:
            server.stop()
    print(
        f"/predict: {rows} rows x {samples} samples, {size / 1e6:.1f} MB, "
        f"{statistics.median(took):.2f} s each ({len(took)} in {args.seconds:g} s)"
    )
    print(f"/healthz idle:            {_summary(idle)}")
    print(f"/healthz during /predict: {_summary(busy)}")


if __name__ == "__main__":
    main()
