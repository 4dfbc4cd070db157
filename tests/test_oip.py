"""The Open Inference Protocol (KServe v2 REST, ``service.api.oip``) on a real server.

The client here is written from the protocol's text (``inference_rest.md``): plain JSON bodies
as the spec gives them, checked against the same server's v1 ``/predict``. Then NVIDIA's own
``tritonclient.http`` (a client of this protocol written by others) talks to it unchanged.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.api.oip import OUTPUTS
from service.testing import Server, running

SPEC = {
    "name": "reg",
    "network": {"type": "mlp", "input_dim": 3, "hidden": [8], "output_dim": 2},
    "likelihood": {"type": "gaussian", "noise_variance": 0.3},
    "filter": {"type": "lofi", "rank": 3},
    "dtype": "float64",
}
ROWS = [[0.2, -1.0, 0.5], [1.5, 0.3, -0.7]]
KEY = "oip-reader-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("oip"), {}) as s:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            assert c.post("/v1/models", json=SPEC).status_code == 201
            g = np.random.default_rng(0)
            x = g.normal(size=(30, 3))
            y = np.stack([x[:, 0] - x[:, 1], np.sin(x[:, 2])], axis=1)
            r = c.post("/v1/models/reg/update", json={"x": x.tolist(), "y": y.tolist()})
            assert r.status_code == 200, r.text
        yield s


def _infer(c: httpx.Client, body: dict[str, Any], name: str = "reg") -> httpx.Response:
    return c.post(f"/v2/models/{name}/infer", json=body)


def test_health_and_metadata_are_the_protocols_objects(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        meta = c.get("/v2").json()
        assert meta["name"] == "postserve" and meta["extensions"] == [] and meta["version"]
        assert c.get("/v2/models/reg/ready").json() == {"name": "reg", "ready": True}
        model = c.get("/v2/models/reg").json()
        assert model["name"] == "reg" and model["platform"] == "postserve"
        assert model["inputs"] == [{"name": "x", "shape": [-1, 3], "datatype": "FP64"}]
        names = [o["name"] for o in model["outputs"]]
        assert names == ["mean", "variance", "epistemic_variance", "aleatoric_variance", "samples"]
        assert model["outputs"][0]["shape"] == [-1, 2]
        assert model["outputs"][-1]["shape"] == [-1, -1, 2]
        for path in ("/v2/models/nope", "/v2/models/nope/ready"):
            r = c.get(path)
            assert r.status_code == 404 and "nope" in r.json()["error"], path


def test_infer_answers_what_v1_predict_answers(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        v1 = c.post("/v1/models/reg/predict", json={"x": ROWS}).json()
        flat = [v for row in ROWS for v in row]
        body = {
            "id": "42",
            "inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP64", "data": flat}],
        }
        r = _infer(c, body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["model_name"], out["id"]) == ("reg", "42")
        assert out["parameters"] == {"version": 30, "point_estimate": False}
        by_name = {o["name"]: o for o in out["outputs"]}
        assert list(by_name) == ["mean", "variance", "epistemic_variance", "aleatoric_variance"]
        for name, o in by_name.items():
            assert (o["shape"], o["datatype"]) == ([2, 2], "FP64")
            assert o["data"] == [v for row in v1[name] for v in row], name  # row-major, exact
        # nested data, an integer datatype, one row as a vector: the same numbers
        nested = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP64", "data": ROWS}]}
        assert _infer(c, nested).json()["outputs"] == out["outputs"]
        one = {"inputs": [{"name": "x", "shape": [3], "datatype": "INT32", "data": [1, 0, -2]}]}
        mean = _infer(c, one).json()["outputs"][0]
        v1_one = c.post("/v1/models/reg/predict", json={"x": [[1, 0, -2]]}).json()
        assert (mean["shape"], mean["data"]) == ([1, 2], v1_one["mean"][0])
        # requested outputs and Thompson samples, seeded as v1's
        sampled = {
            **body,
            "parameters": {"num_samples": 4, "seed": 9},
            "outputs": [{"name": "samples"}, {"name": "mean"}],
        }
        got = {o["name"]: o for o in _infer(c, sampled).json()["outputs"]}
        assert list(got) == ["mean", "samples"]
        v1s = c.post("/v1/models/reg/predict", json={"x": ROWS, "num_samples": 4, "seed": 9}).json()
        assert got["samples"]["shape"] == [4, 2, 2]
        assert got["samples"]["data"] == np.asarray(v1s["samples"]).ravel().tolist()
        assert "id" not in _infer(c, nested).json()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP64", "data": [1.0] * 5}]},
         "does not match its 5 values"),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1.0] * 4}]},
         "shape must be [N, 3]"),
        ({"inputs": [{"name": "z", "shape": [3], "datatype": "FP64", "data": [1.0] * 3}]},
         "takes one input, 'x'"),
        ({"inputs": [{"name": "x", "shape": [3], "datatype": "BYTES", "data": ["a", "b", "c"]}]},
         "is not numeric"),
        ({"inputs": [{"name": "x", "shape": [3], "datatype": "FP64", "data": [1, True, 2]}]},
         "data must be numbers"),
        ({"inputs": [{"name": "x", "shape": [3], "datatype": "FP64", "data": [1, 2, 3]}],
          "outputs": [{"name": "logits"}]}, "unknown outputs ['logits']"),
        ({"inputs": [{"name": "x", "shape": [3], "datatype": "FP64", "data": [1, 2, 3]}],
          "outputs": [{"name": "samples"}]}, "num_samples"),
        ({"inputs": [{"name": "x", "shape": [3], "datatype": "FP64", "data": [1, 2, 3]}],
          "parameters": {"num_samples": -1}}, "num_samples must be a non-negative"),
        ({"inputs": []}, "inputs"),
        ({"input": []}, "inputs"),
    ],
)  # fmt: skip
def test_a_bad_request_is_a_400_with_the_protocols_error(
    server: Server, body: dict[str, Any], says: str
) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        before = c.get("/v1/models/reg").json()["version"]
        r = _infer(c, body)
        assert r.status_code == 400, r.text
        assert set(r.json()) == {"error"} and says in r.json()["error"], r.json()
        assert c.get("/v1/models/reg").json()["version"] == before
        r = _infer(
            c,
            {"inputs": [{"name": "x", "shape": [3], "datatype": "FP64", "data": [0] * 3}]},
            "nope",
        )
        assert r.status_code == 404 and "nope" in r.json()["error"]
        r = c.get("/v2/models/reg/versions/3")
        assert r.status_code == 400 and "does not version" in r.json()["error"]


def test_keys_guard_infer_and_leave_health_open(tmp_path_factory: pytest.TempPathFactory) -> None:
    env = {"POSTSERVE_API_KEYS": f"{KEY}:read,admin-key:admin"}
    with (
        running(tmp_path_factory.mktemp("oip-keys"), env) as s,
        httpx.Client(base_url=s.url, timeout=30) as c,
    ):
        spec = {**SPEC, "name": "k"}
        r = c.post("/v1/models", json=spec, headers={"Authorization": "Bearer admin-key"})
        assert r.status_code == 201
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
        body = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP64", "data": [0] * 3}]}
        r = c.post("/v2/models/k/infer", json=body)
        assert r.status_code == 401 and set(r.json()) == {"error"}
        assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v2/models/k/infer", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, r.text
        r = c.get("/v2/models/k", headers={"Authorization": "Bearer admin-key"})
        assert r.status_code == 403 and "'read' scope" in r.json()["error"]


def test_tritonclient_talks_to_it_unchanged(server: Server) -> None:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("reg")
        meta = client.get_model_metadata("reg")
        assert meta["inputs"][0]["shape"] == [-1, 3]
        x = triton.InferInput("x", [2, 3], "FP64")
        x.set_data_from_numpy(np.asarray(ROWS), binary_data=False)
        outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in ("mean", "variance")]
        result = client.infer("reg", [x], outputs=outputs, request_id="7")
        with httpx.Client(base_url=server.url, timeout=30) as c:
            v1 = c.post("/v1/models/reg/predict", json={"x": ROWS}).json()
        np.testing.assert_array_equal(result.as_numpy("mean"), np.asarray(v1["mean"]))
        np.testing.assert_array_equal(result.as_numpy("variance"), np.asarray(v1["variance"]))
        assert result.get_response()["id"] == "7"
        binary = triton.InferInput("x", [2, 3], "FP64")
        binary.set_data_from_numpy(np.asarray(ROWS), binary_data=True)
        with pytest.raises(triton.InferenceServerException, match="binary tensor data"):
            client.infer("reg", [binary])
    finally:
        client.close()


def test_the_readme_command_answers_as_it_says(server: Server) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Open Inference Protocol (KServe v2)\n", 1)[1].split("\n## ")[0]
    (command,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    spec = {  # the README's Python client section creates it
        "name": "ctr-python",
        "network": {"type": "mlp", "input_dim": 3, "hidden": [16]},
        "likelihood": {"type": "bernoulli"},
        "filter": {"type": "lofi", "rank": 5},
    }
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.post("/v1/models", json=spec).status_code == 201
        try:
            run = subprocess.run(
                ["bash", "-c", command.replace("http://127.0.0.1:8000", server.url)],
                capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
            out = json.loads(run.stdout)
            assert (out["model_name"], out["id"]) == ("ctr-python", "1")
            names = [o["name"] for o in out["outputs"]]
            assert names == [*OUTPUTS[:4], "samples"]
            assert out["outputs"][-1]["shape"] == [4, 1, 1]
            assert all(0 <= p <= 1 for p in out["outputs"][-1]["data"])
        finally:
            c.delete("/v1/models/ctr-python")
