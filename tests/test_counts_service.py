"""Count models through the service (issue 13): the issue's requests against a real server, a
SIGKILL after them (the replay of iterated updates restores every model bit for bit), and the
rule that a step whose model could not predict its own row is refused with nothing changed."""

from __future__ import annotations

import math

import httpx
import numpy as np

from service.testing import MakeAppClient, MakeServer, linear_spec

FILTERS = ("ekf", "diagonal", "lofi")
GRID = [[-2.0], [-1.0], [0.0], [1.0], [2.0]]


def _finite_predictions(c: httpx.Client, name: str) -> dict[str, list[list[float]]]:
    r = c.post(f"/v1/models/{name}/predict", json={"x": GRID})
    assert r.status_code == 200, r.text
    body: dict[str, list[list[float]]] = r.json()
    assert all(math.isfinite(v) for row in body["mean"] + body["variance"] for v in row)
    return body


def test_large_counts_through_a_real_server_then_a_sigkill(make_server: MakeServer) -> None:
    """Default poisson models of each filter: the issue's y = 100 and y = 1000 at x = 1 answer
    200 and leave finite predictions; then 30 draws of Poisson(50), each its own request, all
    200, with finite predictions. After SIGKILL and restart the answers are the same bits."""
    server = make_server()
    rng = np.random.default_rng(3)
    draws = rng.poisson(50, size=30)
    xs = rng.normal(size=30)
    before = {}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for filt in FILTERS:
            name = f"counts-{filt}"
            r = c.post("/v1/models", json=linear_spec(name, 1, likelihood="poisson", filter=filt))
            assert r.status_code == 201, r.text
            for y in (100, 1000):
                r = c.post(f"/v1/models/{name}/update", json={"x": [[1.0]], "y": [y]})
                assert r.status_code == 200, r.text
                _finite_predictions(c, name)
            for x, y in zip(xs, draws, strict=True):
                r = c.post(f"/v1/models/{name}/update", json={"x": [[float(x)]], "y": [int(y)]})
                assert r.status_code == 200, r.text
            before[name] = _finite_predictions(c, name)
            assert 30 < before[name]["mean"][2][0] < 200  # the outliers and the draws between
    server.restart(crash=True)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for name, want in before.items():
            assert c.get(f"/v1/models/{name}").json()["version"] == 32
            assert _finite_predictions(c, name) == want


def test_a_step_the_model_could_not_predict_after_is_refused(app_client: MakeAppClient) -> None:
    """With the moment-matched update (``iterations: 0``) a count of 100 from the default prior
    would leave a rate that overflows at its own row: 422 step_rejected, the version stays, the
    model still predicts and learns. The default (iterated) model takes the same row."""
    with app_client() as c:
        classic = linear_spec("classic", 1, likelihood={"type": "poisson", "iterations": 0})
        assert c.post("/v1/models", json=classic).status_code == 201
        r = c.post("/v1/models/classic/update", json={"x": [[0.5], [1.0]], "y": [1, 100]})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "step_rejected"
        assert "prediction of the row" in r.json()["error"]["message"]
        assert c.get("/v1/models/classic").json()["version"] == 0
        _finite_predictions(c, "classic")
        r = c.post("/v1/models/classic/update", json={"x": [[0.5]], "y": [2]})
        assert r.status_code == 200, r.text

        assert (
            c.post("/v1/models", json=linear_spec("iterated", 1, likelihood="poisson")).status_code
            == 201
        )
        info = c.get("/v1/models/iterated").json()
        assert info["spec"]["likelihood"] == {"type": "poisson", "iterations": 10}
        assert info["spec"]["prior"]["bias_variance"] is None
        r = c.post("/v1/models/iterated/update", json={"x": [[0.5], [1.0]], "y": [1, 100]})
        assert r.status_code == 200, r.text
        _finite_predictions(c, "iterated")
