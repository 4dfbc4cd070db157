"""End to end against a real server process: the README walkthrough verbatim, crash recovery
(bit-identical), concurrent writers, idempotent retries and the Python clients (the sync client
against the app in this process, the async one against the real server)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.client import AsyncClient, Client, PostserveHTTPError
from service.schemas import (
    ModelInfo,
    ModelSpec,
    PredictResponse,
    SnapshotResponse,
    UpdateResponse,
)
from service.testing import MakeAppClient, MakeServer, Server, linear_spec, running
from service.testing.load import LOAD_SPEC, check_acknowledged_survived, updates_until_killed

README = Path(__file__).resolve().parent.parent / "README.md"
README_URL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("server")) as s:
        yield s


def _section(title: str) -> str:
    text = README.read_text()
    assert f"\n## {title}\n" in text, f"README has no section {title!r}"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _walkthrough_commands() -> list[str]:
    """The shell commands of the walkthrough's ```bash blocks, one string per command (a command
    ends at a line with balanced single quotes that does not end in a backslash)."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", _section("Walkthrough (curl)"), re.S):
        current = ""
        for line in block.splitlines(keepends=True):
            current += line
            if current.count("'") % 2 == 0 and not line.rstrip().endswith("\\"):
                if current.strip():
                    commands.append(current.strip())
                current = ""
        assert not current.strip(), f"unterminated command in the walkthrough: {current!r}"
    return commands


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(np.asarray(value, dtype=float).shape)


def test_readme_walkthrough_runs_verbatim(server: Server, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    commands = _walkthrough_commands()
    assert len(commands) == 7, commands
    assert all(c.startswith("curl ") and README_URL in c for c in commands)
    # The status code comes from a curlrc (write-out), so the README's text runs unchanged but for
    # the URL: curl reads $CURL_HOME/.curlrc.
    home = tmp_path / "curlhome"
    home.mkdir()
    (home / ".curlrc").write_text('write-out = "\\n%{http_code}"\n')
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "CURL_HOME": str(home), "HOME": str(home)}

    def run(command: str) -> tuple[int, str]:
        done = subprocess.run(
            ["bash", "-c", command.replace(README_URL, server.url)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        body, _, code = done.stdout.rpartition("\n")
        assert code.isdigit(), f"no status code after the body (curlrc ignored?): {done.stdout!r}"
        return int(code), body

    create, update, predict, get, calibration, snapshot, delete = commands
    assert "-X POST" in create and "/v1/models " in create
    assert "/update" in update and "/predict" in predict
    assert "/snapshot" in snapshot and "-X DELETE" in delete and "/calibration" in calibration

    status, body = run(create)
    assert status == 201, body
    info = json.loads(body)
    assert info["name"] == "ctr-home" and info["version"] == 0
    assert info["spec"]["filter"] == {"type": "lofi", "rank": 5}
    assert info["num_params"] == 3 * 16 + 16 + 16 + 1

    status, body = run(update)
    assert status == 200, body
    first = json.loads(body)
    assert first["version"] == 3 and first["applied"] == 3 and first["duplicate"] is False
    assert len(first["predictions"]) == 3 and len(first["log_likelihood"]) == 3
    for row in first["predictions"]:
        assert len(row["mean"]) == 1 and 0.0 <= row["mean"][0] <= 1.0
        assert len(row["variance"]) == 1 and row["variance"][0] >= 0.0
    assert all(v < 0 for v in first["log_likelihood"])  # log of a probability

    # The README's promise about request_id: the same command again changes nothing.
    status, body = run(update)
    assert status == 200, body
    again = json.loads(body)
    assert again == {**first, "duplicate": True}

    status, body = run(predict)
    assert status == 200, body
    p = json.loads(body)
    assert p["version"] == 3
    assert _shape(p["mean"]) == (2, 1)
    for key in ("variance", "epistemic_variance", "aleatoric_variance"):
        assert _shape(p[key]) == (2, 1)
        assert all(v >= 0 for row in p[key] for v in row)
    assert _shape(p["samples"]) == (4, 2, 1)
    probs = np.asarray(p["mean"] + [r for s in p["samples"] for r in s], dtype=float)
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(
        np.add(p["epistemic_variance"], p["aleatoric_variance"]),
        p["variance"],
        rtol=1e-6,
        atol=1e-9,
    )
    status, body = run(predict)  # the seed makes the draws reproducible
    assert status == 200 and json.loads(body) == p

    status, body = run(get)
    assert status == 200, body
    info = json.loads(body)
    assert info["name"] == "ctr-home" and info["version"] == 3
    assert info["spec"]["likelihood"] == {"type": "bernoulli", "iterations": 10}
    assert info["state_bytes"] > 0

    status, body = run(calibration)  # scored on the pre-update predictions the update returned
    assert status == 200, body
    cal = json.loads(body)
    p_pre = np.array([row["mean"][0] for row in first["predictions"]])
    y_sent = np.array([1.0, 0.0, 1.0])
    assert cal["summary"]["observations"] == 3
    assert cal["summary"]["brier"] == pytest.approx(np.mean((p_pre - y_sent) ** 2), rel=1e-6)
    assert cal["summary"]["log_loss"] == pytest.approx(-np.mean(first["log_likelihood"]), rel=1e-6)
    assert sum(b["count"] for b in cal["reliability"]) == 3
    assert info["calibration"] == cal["summary"]

    status, body = run(snapshot)
    assert status == 200, body
    snap = json.loads(body)
    assert snap["name"] == "ctr-home" and snap["version"] == 3 and snap["bytes"] > 0

    status, body = run(delete)
    assert status == 204, body
    status, body = run(get)
    assert status == 404, body
    assert json.loads(body)["error"]["code"] == "not_found"


def test_readme_python_client_block(server: Server) -> None:
    """The block runs as it stands after the walkthrough (it creates its own model), and a
    second run changes nothing (the request_id makes the update a duplicate)."""
    blocks = re.findall(r"```python\n(.*?)```", _section("Python client"), re.S)
    assert len(blocks) == 1
    code = blocks[0]
    assert README_URL in code
    for run in (1, 2):
        namespace: dict[str, Any] = {}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code.replace(README_URL, server.url), "README.md", "exec"), namespace)
        p = namespace["p"]
        assert isinstance(p, PredictResponse)
        assert p.version == 1
        assert namespace["r"].duplicate == (run == 2)
        assert _shape(p.mean) == (1, 1) and _shape(p.samples) == (8, 1, 1)
        assert out.getvalue().split()[0] == "1"
    with Client(server.url) as client:
        assert client.get_model("ctr-python").version == 1
        client.delete_model("ctr-python")


# -- crash recovery ----------------------------------------------------------------------------

RESTART_MODELS: list[dict[str, Any]] = [
    {
        "name": "gauss-kalman",
        "network": {"type": "linear", "input_dim": 3, "output_dim": 1},
        "likelihood": {"type": "gaussian", "noise_variance": 0.5},
        "filter": {"type": "kalman"},
    },
    {
        "name": "bern-lofi",
        "network": {"type": "mlp", "input_dim": 3, "hidden": [8], "activation": "tanh"},
        "likelihood": {"type": "bernoulli"},
        "filter": {"type": "lofi", "rank": 3},
        "prior": {"variance": 0.2},
        "seed": 3,
    },
    {
        "name": "cat-diag",
        "network": {"type": "mlp", "input_dim": 2, "hidden": [6], "output_dim": 3},
        "likelihood": {"type": "categorical"},
        "filter": {"type": "diagonal"},
    },
    {
        "name": "pois-ekf",
        "network": {"type": "linear", "input_dim": 2},
        "likelihood": {"type": "poisson"},
        "filter": {"type": "ekf"},
        "prior": {"variance": 0.1},
        "dynamics": {"process_noise": 0.001, "decay": 0.999},
    },
    {
        "name": "gauss2-lofi-f64",
        "network": {"type": "mlp", "input_dim": 2, "hidden": [5], "output_dim": 2},
        "likelihood": {"type": "gaussian", "noise_variance": [0.1, 0.3]},
        "filter": {"type": "lofi", "rank": 2},
        "dtype": "float64",
    },
    {
        "name": "gauss-kalman-f64",
        "network": {"type": "linear", "input_dim": 3, "output_dim": 1, "bias": False},
        "likelihood": {"type": "gaussian", "noise_variance": 0.2},
        "filter": {"type": "kalman"},
        "dtype": "float64",
        "dynamics": {"process_noise": 0.01, "decay": 1.0},
    },
]


def _batch(spec: dict[str, Any], rng: random.Random, n: int) -> dict[str, Any]:
    d = spec["network"]["input_dim"]
    out = spec["network"].get("output_dim", 1)
    x = [[round(rng.uniform(-1.5, 1.5), 4) for _ in range(d)] for _ in range(n)]
    kind = spec["likelihood"]["type"]
    y: list[Any]
    if kind == "gaussian" and out == 1:
        y = [round(rng.gauss(0, 1), 4) for _ in range(n)]
    elif kind == "gaussian":
        y = [[round(rng.gauss(0, 1), 4) for _ in range(out)] for _ in range(n)]
    elif kind == "bernoulli":
        y = [rng.randint(0, 1) for _ in range(n)]
    elif kind == "categorical":
        y = [rng.randrange(out) for _ in range(n)]
    else:
        y = [rng.randint(0, 4) for _ in range(n)]
    return {"x": x, "y": y}


def _queries(spec: dict[str, Any]) -> list[dict[str, Any]]:
    rng = random.Random(99)
    x = _batch(spec, rng, 4)["x"]
    return [{"x": x}, {"x": x, "num_samples": 6, "seed": 2024}, {"x": x[:1], "num_samples": 3}]


def _record(url: str) -> dict[str, Any]:
    """Per model: version and the raw bytes of /predict answers with a fixed seed."""
    seen: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=30) as c:
        listed = c.get("/v1/models").json()["models"]
        assert sorted(m["name"] for m in listed) == sorted(s["name"] for s in RESTART_MODELS)
        for spec in RESTART_MODELS:
            name = spec["name"]
            info = c.get(f"/v1/models/{name}").json()
            answers = []
            for q in _queries(spec)[:2]:
                r = c.post(f"/v1/models/{name}/predict", json=q)
                assert r.status_code == 200, r.text
                answers.append(r.content)
            seen[name] = {"version": info["version"], "spec": info["spec"], "predict": answers}
    return seen


def test_restart_after_sigkill_restores_every_model_bit_for_bit(make_server: MakeServer) -> None:
    # snapshot_every=20 also makes background snapshots happen along the way (cat-diag)
    server = make_server(env={"POSTSERVE_SNAPSHOT_EVERY": "20"})
    rng = random.Random(7)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for spec in RESTART_MODELS:
            r = c.post("/v1/models", json=spec)
            assert r.status_code == 201, r.text

        def post(name: str, n: int, request_id: str | None = None) -> None:
            spec = next(s for s in RESTART_MODELS if s["name"] == name)
            body = _batch(spec, rng, n)
            if request_id is not None:
                body["request_id"] = request_id
            r = c.post(f"/v1/models/{name}/update", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["applied"] == n and r.json()["duplicate"] is False

        for i, n in enumerate([4, 1, 7]):
            post("gauss-kalman", n, request_id=f"gk-{i}")
            post("gauss2-lofi-f64", n + 1)
            post("gauss-kalman-f64", n, request_id=f"gk64-{i}" if i % 2 else None)
        for i in range(9):
            post("cat-diag", 5, request_id=f"cat-{i}")  # 45 rows: snapshots at 20 and 40
        post("bern-lofi", 6, request_id="b-0")
        post("bern-lofi", 4)
        snap = c.post("/v1/models/bern-lofi/snapshot")
        assert snap.status_code == 200 and snap.json()["version"] == 10, snap.text
        post("bern-lofi", 5, request_id="b-1")  # restore = snapshot at 10 + replay of 5 rows
        post("bern-lofi", 3)
        post("pois-ekf", 9, request_id="p-0")
        post("pois-ekf", 6)
        snap = c.post("/v1/models/pois-ekf/snapshot")  # restore = this snapshot, no replay
        assert snap.status_code == 200 and snap.json()["version"] == 15, snap.text

    before = _record(server.url)
    versions = {name: v["version"] for name, v in before.items()}
    assert versions == {
        "gauss-kalman": 12,
        "bern-lofi": 18,
        "cat-diag": 45,
        "pois-ekf": 15,
        "gauss2-lofi-f64": 15,
        "gauss-kalman-f64": 12,
    }

    server.restart(crash=True)  # SIGKILL, then a new process on the same data directory
    after = _record(server.url)
    assert after == before
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/v1/models/bern-lofi").json()["snapshot_version"] == 10
        assert c.get("/v1/models/pois-ekf").json()["snapshot_version"] == 15
        assert c.get("/v1/models/gauss-kalman").json()["snapshot_version"] == 0
        # the restored models go on from where they were; the log stays consistent
        for spec in RESTART_MODELS:
            r = c.post(f"/v1/models/{spec['name']}/update", json=_batch(spec, rng, 2))
            assert r.status_code == 200, r.text
            assert r.json()["version"] == versions[spec["name"]] + 2
        # a request_id from before the crash is still known
        r = c.post(
            "/v1/models/gauss-kalman/update",
            json={"x": [[0.0, 0.0, 0.0]], "y": [0.0], "request_id": "gk-2"},
        )
        assert r.status_code == 200 and r.json()["duplicate"] is True
        assert r.json()["version"] == 12

    second = _record(server.url)
    server.restart(crash=False)  # a graceful stop (SIGTERM) and start
    assert _record(server.url) == second
    server.restart(crash=True)
    assert _record(server.url) == second


# -- concurrency --------------------------------------------------------------------------------


def test_64_concurrent_clients_each_posting_10_updates(make_server: MakeServer) -> None:
    server = make_server()
    spec = {
        "name": "busy",
        "network": {"type": "mlp", "input_dim": 2, "hidden": [4]},
        "likelihood": {"type": "bernoulli"},
        "filter": {"type": "lofi", "rank": 2},
    }
    with httpx.Client(base_url=server.url) as c:
        assert c.post("/v1/models", json=spec).status_code == 201

    async def one_client(k: int) -> list[tuple[int, dict[str, Any]]]:
        rng = random.Random(k)
        answers = []
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            for i in range(10):
                body: dict[str, Any] = {
                    "x": [[rng.uniform(-1, 1), rng.uniform(-1, 1)]],
                    "y": [rng.randint(0, 1)],
                }
                if k % 2:
                    body["request_id"] = f"client-{k}-{i}"
                r = await c.post("/v1/models/busy/update", json=body)
                answers.append((r.status_code, r.json()))
        return answers

    async def main() -> list[list[tuple[int, dict[str, Any]]]]:
        return list(await asyncio.gather(*(one_client(k) for k in range(64))))

    per_client = asyncio.run(main())
    answers = [a for client in per_client for a in client]
    assert len(answers) == 640
    assert [s for s, _ in answers if s >= 500] == []
    assert all(s == 200 for s, _ in answers), [a for a in answers if a[0] != 200][:3]
    versions = [a["version"] for _, a in answers]
    assert sorted(versions) == list(range(1, 641))
    for client in per_client:  # each client sees its own updates in order
        mine = [a["version"] for _, a in client]
        assert mine == sorted(mine)
    assert all(a["applied"] == 1 and a["duplicate"] is False for _, a in answers)

    with httpx.Client(base_url=server.url) as c:
        assert c.get("/v1/models/busy").json()["version"] == 640
        query = {"x": [[0.3, -0.2], [1.0, 1.0]], "num_samples": 4, "seed": 5}
        before = c.post("/v1/models/busy/predict", json=query).content
    server.restart(crash=True)  # and the 640 acknowledged rows all survive a crash
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/v1/models/busy").json()["version"] == 640
        assert c.post("/v1/models/busy/predict", json=query).content == before


def test_sigkill_under_concurrent_updates_keeps_every_acknowledged_one(
    make_server: MakeServer,
) -> None:
    """16 clients update one model (their updates share commits) until SIGKILL mid-stream."""
    server = make_server(
        env={"POSTSERVE_SNAPSHOT_EVERY": "1000000", "POSTSERVE_SNAPSHOT_INTERVAL_S": "3600"}
    )
    with httpx.Client(base_url=server.url) as c:
        assert c.post("/v1/models", json=LOAD_SPEC).status_code == 201
    acked = updates_until_killed(server, "load", 3, clients=16, acks=150)
    assert len(acked) >= 150
    db = sqlite3.connect(server.data_dir / "postserve.sqlite3")
    try:
        rows = db.execute(
            "SELECT version, record FROM log WHERE name = 'load' ORDER BY version"
        ).fetchall()
    finally:
        db.close()
    check_acknowledged_survived(server, acked, [(int(v), json.loads(r)) for v, r in rows])


# -- idempotency --------------------------------------------------------------------------------


def test_a_repeated_request_id_is_applied_once_even_after_a_restart(
    make_server: MakeServer,
) -> None:
    server = make_server()
    spec = {
        "name": "idem",
        "network": {"type": "linear", "input_dim": 2},
        "likelihood": {"type": "gaussian", "noise_variance": 0.3},
        "filter": {"type": "ekf"},
    }
    other = {**spec, "name": "idem-other"}
    body = {"x": [[0.5, 1.0], [-1.0, 0.25]], "y": [0.7, -0.2], "request_id": "req-1"}
    query = {"x": [[0.1, 0.2], [1.0, -1.0]], "num_samples": 3, "seed": 17}

    def state(c: httpx.Client) -> tuple[int, bytes]:
        version = c.get("/v1/models/idem").json()["version"]
        return version, c.post("/v1/models/idem/predict", json=query).content

    with httpx.Client(base_url=server.url) as c:
        assert c.post("/v1/models", json=spec).status_code == 201
        assert c.post("/v1/models", json=other).status_code == 201
        r1 = c.post("/v1/models/idem/update", json=body)
        assert r1.status_code == 200, r1.text
        first = r1.json()
        assert first["version"] == 2 and first["applied"] == 2 and first["duplicate"] is False
        after_first = state(c)

        r2 = c.post("/v1/models/idem/update", json=body)
        assert r2.status_code == 200, r2.text
        assert r2.json() == {**first, "duplicate": True}
        assert state(c) == after_first

        # the same request_id with another body is still the first request: nothing applied
        r3 = c.post("/v1/models/idem/update", json={**body, "x": [[9.0, 9.0]], "y": [3.0]})
        assert r3.status_code == 200 and r3.json() == {**first, "duplicate": True}
        assert state(c) == after_first

        # request_ids are per model
        r4 = c.post("/v1/models/idem-other/update", json=body)
        assert r4.status_code == 200 and r4.json()["duplicate"] is False
        assert r4.json()["version"] == 2

        r5 = c.post("/v1/models/idem/update", json={"x": [[1.0, 1.0]], "y": [1.0]})
        assert r5.json()["version"] == 3
        after_more = state(c)

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            same = {"x": [[0.2, 0.2]], "y": [0.1], "request_id": "raced"}
            return list(
                await asyncio.gather(
                    *(ac.post("/v1/models/idem/update", json=same) for _ in range(8))
                )
            )

    raced = asyncio.run(race())
    assert all(r.status_code == 200 for r in raced)
    assert sorted(r.json()["duplicate"] for r in raced) == [False] + [True] * 7
    assert {r.json()["version"] for r in raced} == {4}

    server.restart(crash=True)
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/v1/models/idem").json()["version"] == 4
        r6 = c.post("/v1/models/idem/update", json=body)
        assert r6.status_code == 200 and r6.json() == {**first, "duplicate": True}
        r7 = c.post(
            "/v1/models/idem/update", json={"x": [[0.2, 0.2]], "y": [0.1], "request_id": "raced"}
        )
        assert r7.json()["duplicate"] is True and r7.json()["version"] == 4
        assert c.get("/v1/models/idem").json()["version"] == 4
        assert state(c)[0] == 4
        assert state(c) != after_more


# -- the Python clients -------------------------------------------------------------------------

CLIENT_SPEC = ModelSpec.model_validate(
    {
        "name": "client-demo",
        "network": {"type": "mlp", "input_dim": 2, "hidden": [4], "output_dim": 3},
        "likelihood": {"type": "categorical"},
        "filter": {"type": "lofi", "rank": 2},
    }
)


def test_sync_client_typed_results_and_errors(app_client: MakeAppClient) -> None:
    app = app_client()
    with Client(str(app.base_url), transport=app.transport) as c:
        info = c.create_model(CLIENT_SPEC)
        assert isinstance(info, ModelInfo)
        assert info.name == "client-demo" and info.version == 0 and info.spec == CLIENT_SPEC
        assert info.num_params == 2 * 4 + 4 + 4 * 3 + 3

        up = c.update("client-demo", x=np.array([[0.1, 0.2], [1.0, -1.0]]), y=np.array([2, 0]))
        assert isinstance(up, UpdateResponse)
        assert up.version == 2 and up.applied == 2 and not up.duplicate
        assert len(up.predictions) == 2 and len(up.predictions[0].mean) == 3

        up = c.update("client-demo", x=[[0.0, 0.5]], y=[1], request_id="cl-1")
        assert up.version == 3
        assert c.update("client-demo", x=[[0.0, 0.5]], y=[1], request_id="cl-1").duplicate

        p = c.predict("client-demo", x=[[0.1, 0.2]], num_samples=5, seed=3)
        assert isinstance(p, PredictResponse)
        assert p.version == 3 and _shape(p.mean) == (1, 3) and _shape(p.samples) == (5, 1, 3)
        assert sum(p.mean[0]) == pytest.approx(1.0, abs=1e-5)
        assert c.predict("client-demo", x=[[0.1, 0.2]], num_samples=5, seed=3) == p
        assert c.predict("client-demo", x=[[0.1, 0.2]]).samples == []

        listed = c.list_models()
        assert isinstance(listed, list) and all(isinstance(m, ModelInfo) for m in listed)
        assert "client-demo" in [m.name for m in listed]
        got = c.get_model("client-demo")
        assert isinstance(got, ModelInfo) and got.version == 3

        snap = c.snapshot("client-demo")
        assert isinstance(snap, SnapshotResponse)
        assert snap.name == "client-demo" and snap.version == 3 and snap.bytes > 0
        assert c.get_model("client-demo").snapshot_version == 3

        with pytest.raises(PostserveHTTPError) as e404:
            c.get_model("no-such-model")
        assert e404.value.status == 404 and e404.value.code == "not_found"
        assert "no-such-model" in e404.value.message

        with pytest.raises(PostserveHTTPError) as e422:
            c.update("client-demo", x=[[1.0, 2.0, 3.0]], y=[1])
        assert e422.value.status == 422 and e422.value.code == "invalid_input"
        assert "3 values" in e422.value.message

        with pytest.raises(PostserveHTTPError) as e422b:
            c.update("client-demo", x=[[1.0, 2.0]], y=[7])
        assert e422b.value.status == 422 and "out of range" in e422b.value.message

        with pytest.raises(PostserveHTTPError) as e409:
            c.create_model(CLIENT_SPEC)
        assert e409.value.status == 409 and e409.value.code == "already_exists"

        assert c.get_model("client-demo").version == 3
        assert c.delete_model("client-demo") is None
        with pytest.raises(PostserveHTTPError) as gone:
            c.predict("client-demo", x=[[0.0, 0.0]])
        assert gone.value.status == 404 and gone.value.code == "not_found"


def test_async_client_typed_results_and_errors(server: Server) -> None:
    spec = CLIENT_SPEC.model_copy(update={"name": "client-async"})

    async def main() -> None:
        async with AsyncClient(server.url) as c:
            info = await c.create_model(spec.model_dump())
            assert isinstance(info, ModelInfo) and info.version == 0
            up = await c.update("client-async", x=[[0.1, 0.2]], y=[1], request_id="a-1")
            assert isinstance(up, UpdateResponse) and up.version == 1
            again = await c.update("client-async", x=[[0.1, 0.2]], y=[1], request_id="a-1")
            assert again.duplicate and again.version == 1
            p = await c.predict("client-async", x=[[0.1, 0.2], [0.3, 0.4]], num_samples=2, seed=9)
            assert isinstance(p, PredictResponse)
            assert _shape(p.mean) == (2, 3) and _shape(p.samples) == (2, 2, 3)
            models = await c.list_models()
            assert "client-async" in [m.name for m in models]
            assert (await c.get_model("client-async")).version == 1
            snap = await c.snapshot("client-async")
            assert isinstance(snap, SnapshotResponse) and snap.version == 1

            with pytest.raises(PostserveHTTPError) as e404:
                await c.update("nope", x=[[0.0, 0.0]], y=[0])
            assert e404.value.status == 404 and e404.value.code == "not_found"
            with pytest.raises(PostserveHTTPError) as e422:
                await c.predict("client-async", x=[[0.0, 0.0]], num_samples=-1)
            assert e422.value.status == 422 and e422.value.code == "invalid_input"
            assert "num_samples" in e422.value.message

            await c.delete_model("client-async")
            with pytest.raises(PostserveHTTPError) as gone:
                await c.get_model("client-async")
            assert gone.value.status == 404

    asyncio.run(main())


def test_the_model_list_pages_by_name(make_server: MakeServer) -> None:
    server = make_server()
    names = [f"page-{i}" for i in (3, 0, 4, 1, 2)]
    with Client(server.url) as c, httpx.Client(base_url=server.url, timeout=30) as raw:
        for name in names:
            c.create_model(linear_spec(name, 2))
        everything = raw.get("/v1/models").json()
        assert [m["name"] for m in everything["models"]] == sorted(names)
        assert everything["next_after"] is None
        pages, after = [], None
        while True:
            query = {"limit": 2} | ({} if after is None else {"after": after})
            page = raw.get("/v1/models", params=query).json()
            pages.append([m["name"] for m in page["models"]])
            after = page["next_after"]
            if after is None:
                break
            assert after == pages[-1][-1]
        assert pages == [["page-0", "page-1"], ["page-2", "page-3"], ["page-4"]]
        # the client's pages follow the last name of the one before; past the end: none
        assert [m.name for m in c.list_models(limit=3, after="page-1")] == [
            "page-2", "page-3", "page-4"
        ]  # fmt: skip
        assert c.list_models(limit=2, after="page-4") == []
        assert [m.name for m in c.list_models(after="page-0a")] == [
            "page-1",
            "page-2",
            "page-3",
            "page-4",
        ]
        for bad in ({"limit": 0}, {"limit": 10_001}, {"limit": "two"}):
            r = raw.get("/v1/models", params=bad)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input", bad
            assert "limit" in r.json()["error"]["message"]
