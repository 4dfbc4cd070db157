"""A cluster on loopback: Debian's nginx with ``deploy/nginx/postserve.conf`` (the routing rule of
``deploy/kubernetes``: ``hash $postserve_model consistent``) in front of three Postserve
processes on one Redis with AOF (appendfsync always).

Traffic goes to 100 models through nginx, each model's updates in order from one client thread
(request ids, retried on 502, 503 and 409 until acknowledged). One replica is SIGKILLed mid-stream:
nginx routes its models to the next replicas on the ring, which take them over once its leases
lapse (catch-up from snapshot + stream). It comes back at its address and its models return to
it (the interim owners release their idle leases); then a fourth replica joins and about a
quarter of the models move, all of them to it. At the end every acknowledged update is in its
model exactly once (acknowledged versions 1..n, final version n) and every model's predictive
equals that of a single-process twin fed the same updates.

nginx comes from ``.ci/setup`` (apt-get) as redis-server does; the test skips without it.
"""

from __future__ import annotations

import concurrent.futures
import getpass
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.testing import RedisServer, Server, free_port, in_process

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SPEC = {
    "network": {"type": "linear", "input_dim": 3, "output_dim": 1},
    "likelihood": {"type": "gaussian", "noise_variance": 0.5},
    "filter": {"type": "kalman"},
    "dtype": "float64",
}
PROBE = {"x": [[0.3, -1.0, 2.0], [1.0, 0.5, -0.2]]}
MODELS, CLIENTS = 100, 8
LEASE_MS, IDLE_S = 1500, 1.0
RETRY_S = 30.0  # the longest an update may take to be acknowledged, retries included


def _nginx() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip("nginx is not installed (.ci/setup installs it)")
    return found


class Nginx:
    """nginx (master + one worker) on a free port with deploy/nginx/postserve.conf as it is
    (only its listen address changed), the replicas in postserve-upstreams.conf beside it."""

    def __init__(self, workdir: Path) -> None:
        self.binary, self.dir, self.port = _nginx(), workdir, free_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = (DEPLOY / "nginx" / "postserve.conf").read_text()
        conf, n = re.subn(r"listen 8080;", f"listen 127.0.0.1:{self.port};", conf)
        assert n == 1, "deploy/nginx/postserve.conf has no 'listen 8080;' line"
        (self.dir / "postserve.conf").write_text(conf)
        user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
        temp = " ".join(
            f"{k}_temp_path {self.dir / k};" for k in ("client_body", "proxy", "fastcgi")
        )
        (self.dir / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {self.dir / 'nginx.pid'};\n"
            f"error_log {self.dir / 'error.log'} warn;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n access_log off;\n {temp}\n"
            f" uwsgi_temp_path {self.dir / 'uwsgi'}; scgi_temp_path {self.dir / 'scgi'};\n"
            f" include {self.dir / 'postserve.conf'};\n}}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, replicas: list[Server]) -> None:
        """Write the upstream list (and reload nginx if it runs)."""
        lines = [f"server 127.0.0.1:{r.port} max_fails=1 fail_timeout=2s;\n" for r in replicas]
        (self.dir / "postserve-upstreams.conf").write_text("".join(lines))
        if self.proc is not None:
            self._check()
            self.proc.send_signal(signal.SIGHUP)

    def _check(self) -> None:
        test = [self.binary, "-t", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")]
        out = subprocess.run(test, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr

    def start(self) -> Nginx:
        self._check()
        cmd = [self.binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")]
        self.proc = subprocess.Popen([*cmd, "-g", "daemon off;"], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{self.url}/healthz", timeout=2)
                return self
            except httpx.TransportError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "no nginx"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def _row(model: int, i: int) -> tuple[list[float], float]:
    rng = random.Random(model * 1_000 + i)
    x = [round(rng.uniform(-2, 2), 6) for _ in range(3)]
    return x, round(0.5 * x[0] - x[1] + 0.25 * x[2] + rng.gauss(0, 0.5), 6)


@dataclass
class Traffic:
    """What the clients saw: per model, the acknowledged version of each update, the replica that
    answered its last one, when each was acknowledged; retries by status."""

    acked: dict[int, list[int]] = field(default_factory=lambda: {m: [] for m in range(MODELS)})
    upstream: dict[int, str] = field(default_factory=dict)
    acked_at: dict[int, list[float]] = field(default_factory=lambda: {m: [] for m in range(MODELS)})
    retries: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sent(self, m: int) -> int:
        return len(self.acked[m])

    def send(self, client: httpx.Client, m: int) -> None:
        """Post model m's next update until acknowledged (the same request_id each time)."""
        i = self.sent(m)
        x, y = _row(m, i)
        body = {"x": [x], "y": [y], "request_id": f"m{m}-u{i}"}
        deadline = time.monotonic() + RETRY_S
        while True:
            try:
                r = client.post(f"/v1/models/m{m}/update", json=body)
                status = str(r.status_code)
            except httpx.TransportError as exc:
                r, status = None, type(exc).__name__
            if r is not None and r.status_code == 200:
                break
            assert status in {"409", "502", "503", "504"} or r is None, (status, r and r.text)
            with self.lock:
                self.retries[status] = self.retries.get(status, 0) + 1
            assert time.monotonic() < deadline, f"m{m} update {i} never acknowledged: {status}"
            time.sleep(0.02)
        self.acked[m].append(int(r.json()["version"]))
        self.acked_at[m].append(time.monotonic())
        self.upstream[m] = r.headers["x-postserve-upstream"].split(",")[-1].strip()

    def round(self, url: str, per_model: int, during: Any = None) -> None:
        """``per_model`` more updates of every model, from CLIENTS threads (each owns models
        m = k mod CLIENTS, so each model's updates go in order); ``during()`` runs alongside."""

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                for _ in range(per_model):
                    for m in range(k, MODELS, CLIENTS):
                        self.send(c, m)

        with concurrent.futures.ThreadPoolExecutor(CLIENTS + 1) as pool:
            futures = [pool.submit(client, k) for k in range(CLIENTS)]
            if during is not None:
                futures.append(pool.submit(during))
            for f in futures:
                f.result()


def _models_on(traffic: Traffic, replica: Server) -> set[int]:
    return {m for m, a in traffic.upstream.items() if a == f"127.0.0.1:{replica.port}"}


def _start_all(replicas: list[Server]) -> None:
    with concurrent.futures.ThreadPoolExecutor(len(replicas)) as pool:
        list(pool.map(lambda r: r.start(), replicas))


@pytest.mark.slow
def test_nginx_cluster_kill_takeover_and_scale_up(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", "always").start()
    env = {
        "POSTSERVE_STORE": "redis",
        "POSTSERVE_REDIS_URL": redis.url,
        "POSTSERVE_REDIS_LEASE_MS": str(LEASE_MS),
        "POSTSERVE_REDIS_LEASE_IDLE_S": str(IDLE_S),
        "POSTSERVE_SNAPSHOT_EVERY": "5",
    }
    replicas = [Server(tmp_path / f"replica-{k}", env) for k in range(4)]
    nginx = Nginx(tmp_path / "nginx")
    traffic = Traffic()
    try:
        _start_all(replicas[:3])
        nginx.route(replicas[:3])
        nginx.start()
        with httpx.Client(base_url=nginx.url, timeout=30) as c:
            for m in range(MODELS):
                r = c.post("/v1/models", json={"name": f"m{m}", **SPEC})
                assert r.status_code == 201, r.text
        traffic.round(nginx.url, 2)
        spread = [len(_models_on(traffic, r)) for r in replicas[:3]]
        assert sum(spread) == MODELS and min(spread) >= 10, spread  # every replica has models
        victim = max(replicas[:3], key=lambda r: len(_models_on(traffic, r)))
        orphans = _models_on(traffic, victim)

        # -- a replica dies mid-stream ---------------------------------------------------------
        killed: list[float] = []

        def kill_midway() -> None:
            while sum(map(traffic.sent, range(MODELS))) < MODELS * 5:
                time.sleep(0.01)
            victim.kill()
            killed.append(time.monotonic())

        traffic.round(nginx.url, 6, during=kill_midway)
        (t_kill,) = killed
        after = {m: [t for t in traffic.acked_at[m] if t > t_kill] for m in orphans}
        takeover = max(ts[0] for ts in after.values()) - t_kill
        survivors = {traffic.upstream[m] for m in orphans}
        assert f"127.0.0.1:{victim.port}" not in survivors  # nginx routed around it
        assert takeover < LEASE_MS / 1000 + 10, takeover

        # -- it comes back at its address; its models return to it ----------------------------
        victim.start(port=victim.port)
        time.sleep(2.5)  # nginx's fail_timeout: then it is tried again
        traffic.round(nginx.url, 2)
        assert _models_on(traffic, victim) == orphans
        before = dict(traffic.upstream)

        # -- a fourth replica joins ----------------------------------------------------------------
        replicas[3].start()
        nginx.route(replicas)
        time.sleep(1.0)  # the reload: new workers, the old ones finish what they hold
        traffic.round(nginx.url, 3)
        moved = {m for m in range(MODELS) if traffic.upstream[m] != before[m]}
        joined = f"127.0.0.1:{replicas[3].port}"
        assert {traffic.upstream[m] for m in moved} == {joined}, "a model moved elsewhere"
        assert 10 <= len(moved) <= 45, len(moved)

        # -- nothing acknowledged is lost, nothing applied twice; the twin agrees --------------
        with httpx.Client(base_url=nginx.url, timeout=30) as c, in_process() as twin:
            for m in range(MODELS):
                n = traffic.sent(m)
                assert traffic.acked[m] == list(range(1, n + 1)), (m, traffic.acked[m])
                r = c.get(f"/v1/models/m{m}")
                assert r.status_code == 200 and r.json()["version"] == n, r.text
                twin.post("/v1/models", json={"name": f"m{m}", **SPEC}).raise_for_status()
                for x, y in (_row(m, i) for i in range(n)):  # one row a request, as sent
                    twin.post(f"/v1/models/m{m}/update", json={"x": [x], "y": [y]})
                want = twin.post(f"/v1/models/m{m}/predict", json=PROBE).json()
                got = c.post(f"/v1/models/m{m}/predict", json=PROBE).json()
                assert got["version"] == want["version"] == n
                for key in ("mean", "variance"):
                    assert got[key] == want[key], (m, key, got[key], want[key])
    finally:
        nginx.stop()
        for r in replicas:
            r.stop()
        redis.stop()
    total = sum(map(traffic.sent, range(MODELS)))
    print(
        f"\ncluster: {total} updates acknowledged, lost 0, applied twice 0; "
        f"{len(orphans)} models on the killed replica, taken over within {takeover:.2f} s of "
        f"the kill (lease {LEASE_MS} ms); scale-up 3 -> 4 moved {len(moved)} of {MODELS} "
        f"models, all to the new replica; retries by status {dict(sorted(traffic.retries.items()))}"
    )
