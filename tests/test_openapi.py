"""The OpenAPI document against the service that serves it.

* The document itself: every operation has a summary, a description and (with a body) example
  bodies; every error it lists is the one error body with a code the service sends at that
  status; FastAPI's ``{"detail": ...}`` 422, which is never sent, is gone; 401 and 403 and the
  bearer scheme appear exactly when API keys are configured.
* Every documented example, posted in order to a real server, is answered 2xx.
* ``/docs`` and ``/redoc`` load nothing but this server's own files, and those are served.
* schemathesis against a real server (the embedded SQLite store, API keys on): every operation,
  at most :data:`MAX_EXAMPLES` generated cases each (plus its examples, coverage and stateful
  phases), every check on, a fixed seed. It must find nothing but the documented false
  positives of :data:`FALSE_POSITIVES`, which the run is configured to accept. (It warns that
  most generated ``/update`` bodies are refused: random rows seldom have the model's width, and
  a bernoulli label must be 0 or 1. A warning is not a failure.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.api.operations import DELETED, MODEL
from service.testing import MakeServer, Server, in_process, running

KEY = "openapi-test-key"  # holds every scope
KEYS = f"{KEY}:read,{KEY}:write,{KEY}:admin"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: small limits, so that fuzzed specs stay cheap
ENV = {
    "POSTSERVE_API_KEYS": KEYS,
    "POSTSERVE_MAX_STATE_BYTES": "10000000",
    "POSTSERVE_MAX_TOTAL_STATE_BYTES": "200000000",
}
#: the operations in an order in which their examples work one after the other
ORDER = [
    "create_model", "list_models", "get_model", "update", "predict", "decide", "reward",
    "decide_batch", "reward_batch", "calibration", "influence", "snapshot", "healthz", "readyz",
    "delete_model",
]  # fmt: skip
METHODS = {"get", "post", "put", "patch", "delete"}


def _document(**settings: Any) -> dict[str, Any]:
    client = in_process(**settings)
    try:
        r = client.get("/openapi.json")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc
    finally:
        client.close()


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("openapi"), ENV) as s:
        yield s


# -- the document ------------------------------------------------------------------------------


@pytest.mark.parametrize("keys", [False, True], ids=["open", "with-keys"])
def test_every_operation_is_documented(keys: bool) -> None:
    doc = _document(**({"api_keys": KEYS} if keys else {}))
    ops = {op["operationId"]: (path, method, op) for path, method, op in _operations(doc)}
    assert sorted(ops) == sorted(ORDER)
    for op_id, (_, method, op) in ops.items():
        assert op.get("summary") and op.get("description"), op_id
        assert op.get("tags") and op["tags"][0] in {t["name"] for t in doc["tags"]}, op_id
        answer = next(r for status, r in op["responses"].items() if status.startswith("2"))
        assert answer["description"] != "Successful Response", op_id
        if "requestBody" in op:
            assert op["requestBody"]["content"]["application/json"]["examples"], op_id
        for parameter in op.get("parameters", []):
            assert parameter.get("example") and parameter.get("description"), op_id
        statuses = set(op["responses"])
        assert (method == "delete") == ("204" in statuses), op_id
        assert ("401" in statuses) == (keys and op_id not in ("healthz", "readyz")), op_id
        assert ("security" in op) == ("401" in statuses), op_id
    assert ("securitySchemes" in doc["components"]) == keys
    assert "HTTPValidationError" not in json.dumps(doc)
    assert '"detail"' not in json.dumps(doc)


def test_every_documented_error_is_the_error_body_with_a_real_code() -> None:
    """Each 4xx/5xx is the one error body, its examples' codes those answered at that status
    (the table in service/api/errors.py); readiness's 503 is its own body."""
    from service.api.openapi import status_of

    doc = _document(api_keys=KEYS)
    seen: set[str] = set()
    for _, _, op in _operations(doc):
        for status, response in op["responses"].items():
            if status.startswith("2"):
                continue
            media = response["content"]["application/json"]
            if op["operationId"] == "readyz":
                assert media["schema"] == {"$ref": "#/components/schemas/Readiness"}
                continue
            assert media["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}, op
            assert media["examples"], (op["operationId"], status)
            for example in media["examples"].values():
                error = example["value"]["error"]
                assert set(error) == {"code", "message"} and error["message"]
                assert status_of(error["code"]) == int(status), (op["operationId"], error)
                assert f"`{error['code']}`" in response["description"]
                seen.add(error["code"])
    error = doc["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    assert doc["components"]["schemas"]["ErrorDetail"]["required"] == ["code", "message"]
    assert {"not_found", "invalid_input", "too_large", "unauthorized", "forbidden"} <= seen


def test_the_documented_examples_work_on_a_real_server(server: Server) -> None:
    """Every example, in ORDER, answered 2xx: the create examples, then the model's
    operations on ``ctr-home``, the delete on ``demand-daily``."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        doc = c.get("/openapi.json").json()
        ops = {op["operationId"]: (path, method, op) for path, method, op in _operations(doc)}
        for op_id in ORDER:
            path, method, op = ops[op_id]
            query = {}
            for parameter in op.get("parameters", []):
                if parameter["in"] == "path":
                    path = path.replace("{" + parameter["name"] + "}", parameter["example"])
                else:
                    query[parameter["name"]] = parameter["example"]
            media = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            bodies = [e["value"] for e in media.get("examples", {}).values()] or [None]
            for body in bodies:
                r = c.request(method, path, json=body, params=query)
                assert 200 <= r.status_code < 300, (op_id, body, r.status_code, r.text)
        models = [m["name"] for m in c.get("/v1/models").json()["models"]]
        assert models == [MODEL], models
        assert c.get(f"/v1/models/{MODEL}").json()["version"] == 6  # 3 updates, 3 rewards
        assert c.get(f"/v1/models/{DELETED}").status_code == 404


# -- /docs and /redoc offline ------------------------------------------------------------------

CONTENT_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".json": "application/json",
}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_only_this_servers_files(server: Server, page: str) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        assert not re.search(r"https?://|//[a-z]", html, re.I), html  # no other host
        refs = re.findall(r'(?:src|href|spec-url)="([^"]+)"', html)
        refs += re.findall(r"url: '([^']+)'", html)  # Swagger UI's document
        assert "/openapi.json" in refs and any(ref.endswith(".js") for ref in refs), refs
        for ref in refs:
            assert ref.startswith("/"), ref
            asset = c.get(ref)
            assert asset.status_code == 200, ref
            want = CONTENT_TYPES[Path(ref).suffix]
            assert asset.headers["content-type"].startswith(want), (ref, asset.headers)
            assert len(asset.content) > 1000, ref


# -- schemathesis ------------------------------------------------------------------------------

MAX_EXAMPLES = 50
SEED = 20261201
#: What the run is configured to accept, with the reason each is not a fault of the service.
FALSE_POSITIVES = {
    "positive_data_acceptance: 413 and 422 for bodies the schema allows": (
        "the schema of a request is the same for every model, but a body must also fit the "
        "model it is sent to (each row's width is the model's input_dim, labels in its "
        "likelihood's support: 422 invalid_input), the spec must be buildable (a categorical "
        "likelihood needs 2 outputs, kalman a linear gaussian model: 422 invalid_spec), the "
        "step must keep the posterior valid (422 step_rejected), and rows, samples and state "
        "size have configured limits (413 too_large); each of these is documented"
    ),
    "ensure_resource_availability on the /reward operations": (
        "a reward's 404 names an unknown event of the model, not a missing model; "
        "schemathesis reads any 404 after a create as the created model gone"
    ),
}
CONFIG = """
[checks]
enabled = true  # every check

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "413", "422", "429", "5xx"]

[[operations]]
include-path-regex = "/reward"
checks.ensure_resource_availability.enabled = false

# The example model and events, most of the time: fuzzed bodies reach a real model.
[dictionaries.models]
values = ["MODEL"]

[dictionaries.doomed]
values = ["DELETED"]

[dictionaries.events]
values = ["evt-0001", "evt-0002", "evt-0003"]

[parameters]
"path.name" = { dictionary = "models", probability = 0.8 }
"body.event_id" = { dictionary = "events", probability = 0.5 }
"body.items[*].event_id" = { dictionary = "events", probability = 0.5 }

[[operations]]
include-method = "DELETE"
parameters = { "path.name" = { dictionary = "doomed", probability = 0.8 } }
""".replace("MODEL", MODEL).replace("DELETED", DELETED)


def _create_examples(url: str) -> None:
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
        doc = c.get("/openapi.json").json()
        create = doc["paths"]["/v1/models"]["post"]["requestBody"]["content"]["application/json"]
        for example in create["examples"].values():
            r = c.post("/v1/models", json=example["value"])
            assert r.status_code == 201, r.text


def _report(path: Path) -> tuple[set[str], int, set[str]]:
    """(operations tested, cases sent, checks run) from schemathesis's NDJSON events."""
    operations: set[str] = set()
    checks: set[str] = set()
    cases = 0
    for line in path.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished or not isinstance(finished.get("recorder"), dict):
            continue
        recorder = finished["recorder"]
        if not recorder["label"].startswith("Stateful"):
            operations.add(recorder["label"])
        cases += len(recorder.get("interactions") or {})
        for results in (recorder.get("checks") or {}).values():
            checks.update(result["name"] for result in results)
    return operations, cases, checks


def test_schemathesis_finds_nothing_on_a_real_server(
    make_server: MakeServer, tmp_path: Path
) -> None:
    from schemathesis.checks import CHECKS, load_all_checks

    server = make_server(env=ENV)
    _create_examples(server.url)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    reports = tmp_path / "reports"
    command = [
        sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
        "--config-file", str(config), "run", f"{server.url}/openapi.json",
        "--header", f"Authorization: Bearer {KEY}",
        "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
        "--generation-database", "none", "--no-color", "--request-timeout", "30",
        # Hypothesis's health checks judge the data generation (too slow on a busy machine),
        # not the service: never a reason to fail this run.
        "--suppress-health-check", "all",
        "--report", "ndjson", "--report-dir", str(reports),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = run.stdout + run.stderr
    failures = out[out.find("FAILURES") :] if "FAILURES" in out else out[-6000:]
    assert run.returncode == 0, f"schemathesis found failures:\n{failures}"
    assert "FAILURES" not in out and "ERRORS" not in out, out[-6000:]
    operations, cases, checks = _report(next(reports.glob("*.ndjson")))
    assert len(operations) == len(ORDER), sorted(operations)
    assert cases > len(ORDER) * MAX_EXAMPLES, cases
    load_all_checks()
    assert checks == {check.__name__ for check in CHECKS.get_all()}, checks
