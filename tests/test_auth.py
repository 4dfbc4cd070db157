"""API keys and scopes: every route answers 401 without a (known) key, 403 with a key lacking its
scope and 2xx with the right one; /healthz, /readyz and /metrics stay open. Without keys the
server refuses to listen beyond 127.0.0.1.

The route matrix runs against the app in this process; a real server process (bound to 0.0.0.0)
checks keys, open probes and where it listens."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from service.testing import MakeAppClient, MakeServer, Server, in_process, linear_spec, running

KEYS = {"read": "r-key", "write": "w-key", "admin": "a-key"}
API_KEYS = ",".join(f"{key}:{scope}" for scope, key in KEYS.items())

SPEC = linear_spec("guarded", 2, likelihood="bernoulli", filter="diagonal")
_names = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # with keys, binding beyond loopback is allowed (and 127.0.0.1 still reaches it)
    with running(
        tmp_path_factory.mktemp("auth"),
        env={"POSTSERVE_API_KEYS": API_KEYS},
        args=["--host", "0.0.0.0"],
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    """The app with the keys, served in this process."""
    with in_process(api_keys=API_KEYS) as c:
        r = c.post("/v1/models", json=SPEC, headers=_bearer("a-key"))
        assert r.status_code == 201, r.text
        yield c


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass(frozen=True)
class Route:
    id: str
    scope: str
    ok: int
    # (client) -> (method, path, json body); called afresh for each request (create and delete
    # need a new name / an existing model every time)
    request: Callable[[httpx.Client], tuple[str, str, Any]]


def _create(c: httpx.Client) -> tuple[str, str, Any]:
    return "POST", "/v1/models", {**SPEC, "name": f"made-{next(_names)}"}


def _delete(c: httpx.Client) -> tuple[str, str, Any]:
    name = f"victim-{next(_names)}"
    r = c.post("/v1/models", json={**SPEC, "name": name}, headers=_bearer("a-key"))
    assert r.status_code == 201, r.text
    return "DELETE", f"/v1/models/{name}", None


def _reward(c: httpx.Client) -> tuple[str, str, Any]:
    body = {"actions": [[0.1, 0.2], [0.3, 0.4]]}
    r = c.post("/v1/models/guarded/decide", json=body, headers=_bearer("w-key"))
    assert r.status_code == 200, r.text
    return "POST", "/v1/models/guarded/reward", {"event_id": r.json()["event_id"], "reward": 1}


def _reward_batch(c: httpx.Client) -> tuple[str, str, Any]:
    method, path, body = _reward(c)
    return method, f"{path}/batch", {"items": [body]}


ROUTES = [
    Route("create", "admin", 201, _create),
    Route("list", "read", 200, lambda c: ("GET", "/v1/models", None)),
    Route("get", "read", 200, lambda c: ("GET", "/v1/models/guarded", None)),
    Route("delete", "admin", 204, _delete),
    Route(
        "update",
        "write",
        200,
        lambda c: ("POST", "/v1/models/guarded/update", {"x": [[0.1, 0.2]], "y": [1]}),
    ),
    Route(
        "predict",
        "read",
        200,
        lambda c: ("POST", "/v1/models/guarded/predict", {"x": [[0.1, 0.2]], "num_samples": 2}),
    ),
    Route("snapshot", "admin", 200, lambda c: ("POST", "/v1/models/guarded/snapshot", None)),
    Route("calibration", "read", 200, lambda c: ("GET", "/v1/models/guarded/calibration", None)),
    Route(
        "decide",
        "write",
        200,
        lambda c: ("POST", "/v1/models/guarded/decide", {"actions": [[0.1, 0.2], [0.3, 0.4]]}),
    ),
    Route("reward", "write", 200, _reward),
    Route(
        "decide batch",
        "write",
        200,
        lambda c: (
            "POST",
            "/v1/models/guarded/decide/batch",
            {"items": [{"actions": [[0.1, 0.2], [0.3, 0.4]]}]},
        ),
    ),
    Route("reward batch", "write", 200, _reward_batch),
]

NO_KEY: list[tuple[str, dict[str, str]]] = [
    ("no-header", {}),
    ("unknown-key", _bearer("nope")),
    ("bearer-without-key", {"Authorization": "Bearer"}),
    ("key-without-bearer", {"Authorization": "a-key"}),
    ("basic-auth", {"Authorization": "Basic YS1rZXk6"}),
    ("key-in-other-case", _bearer("A-KEY")),
    ("key-prefix", _bearer("a-ke")),
    ("key-with-suffix", _bearer("a-key2")),
]


def _send(c: httpx.Client, route: Route, headers: dict[str, str]) -> httpx.Response:
    method, path, body = route.request(c)
    return c.request(method, path, json=body, headers=headers)


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    return body


def _version(c: httpx.Client) -> int:
    r = c.get("/v1/models/guarded", headers=_bearer("r-key"))
    assert r.status_code == 200
    version: int = r.json()["version"]
    return version


@pytest.mark.parametrize("route", ROUTES, ids=[r.id for r in ROUTES])
def test_each_route_needs_a_key_with_its_scope(client: httpx.Client, route: Route) -> None:
    before = _version(client)
    names_before = {
        m["name"] for m in client.get("/v1/models", headers=_bearer("r-key")).json()["models"]
    }
    for why, headers in NO_KEY:
        r = _send(client, route, headers)
        body = _error(r, 401, "unauthorized")
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), why
        assert "key" in body["error"]["message"].lower(), why
    for scope, key in KEYS.items():
        if scope == route.scope:
            continue
        body = _error(_send(client, route, _bearer(key)), 403, "forbidden")
        assert route.scope in body["error"]["message"], body
    # nothing happened: the refused creates, deletes and updates changed nothing
    names_after = {
        m["name"] for m in client.get("/v1/models", headers=_bearer("r-key")).json()["models"]
    }
    created = {n for n in names_after - names_before if n.startswith("victim-")}
    assert names_after - created == names_before  # only the delete route's own victims appeared
    assert _version(client) == before

    r = _send(client, route, _bearer(KEYS[route.scope]))
    assert r.status_code == route.ok, r.text
    r = _send(client, route, {"authorization": f"bearer {KEYS[route.scope]}"})  # scheme any case
    assert r.status_code == route.ok, r.text


def test_a_key_listed_with_several_scopes_holds_each(app_client: MakeAppClient) -> None:
    keys = "multi:read,multi:write,solo:read"
    with app_client(api_keys=keys + ",adm:admin") as c:
        assert c.post("/v1/models", json=SPEC, headers=_bearer("adm")).status_code == 201
        update = {"x": [[0.1, 0.2]], "y": [0]}
        r = c.post("/v1/models/guarded/update", json=update, headers=_bearer("multi"))
        assert r.status_code == 200, r.text
        r = c.post("/v1/models/guarded/predict", json={"x": [[0.0, 0.0]]}, headers=_bearer("multi"))
        assert r.status_code == 200, r.text
        r = c.post("/v1/models/guarded/update", json=update, headers=_bearer("solo"))
        _error(r, 403, "forbidden")
        r = c.post("/v1/models/guarded/snapshot", headers=_bearer("multi"))
        _error(r, 403, "forbidden")


def test_auth_comes_before_everything_else(client: httpx.Client) -> None:
    """Without a key, an unknown model or an invalid body is just 401."""
    _error(client.get("/v1/models/no-such-model"), 401, "unauthorized")
    _error(client.post("/v1/models/no-such-model/update", json={"x": [[1.0]]}), 401, "unauthorized")
    _error(client.post("/v1/models/guarded/update", json={"x": "abc"}), 401, "unauthorized")
    _error(client.post("/v1/models", json={"name": "a b"}), 401, "unauthorized")
    # a read key asking to write into an unknown model is refused for the scope, not 404
    r = client.post(
        "/v1/models/no-such-model/update",
        json={"x": [[1.0, 2.0]], "y": [1]},
        headers=_bearer("r-key"),
    )
    _error(r, 403, "forbidden")


def test_a_malformed_body_without_a_key_is_401(client: httpx.Client) -> None:
    """Authentication comes before parsing: no key and a body that is not JSON is 401 too."""
    r = client.post(
        "/v1/models/guarded/update",
        content=b'{"x": [[1.0, 2.0]], "y": [',
        headers={"content-type": "application/json"},
    )
    _error(r, 401, "unauthorized")


def _probes_are_open(c: httpx.Client) -> None:
    for headers in ({}, _bearer("nope"), _bearer("r-key")):
        r = c.get("/healthz", headers=headers)
        assert r.status_code == 200 and r.json() == {"ok": True}
        r = c.get("/readyz", headers=headers)
        assert r.status_code == 200 and r.json()["ready"] is True
        r = c.get("/metrics", headers=headers)  # for Prometheus, like the probes
        assert r.status_code == 200 and "postserve_models " in r.text


def test_health_and_readiness_are_open(client: httpx.Client) -> None:
    _probes_are_open(client)


def test_a_real_server_checks_keys_and_listens_everywhere(server: Server) -> None:
    """Keys and scopes, open probes, and the address it binds, through uvicorn."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        _probes_are_open(c)
        spec = {**SPEC, "name": "served"}
        _error(c.post("/v1/models", json=spec), 401, "unauthorized")
        _error(c.post("/v1/models", json=spec, headers=_bearer("w-key")), 403, "forbidden")
        assert c.post("/v1/models", json=spec, headers=_bearer("a-key")).status_code == 201
        update = {"x": [[0.1, 0.2]], "y": [1]}
        r = c.post("/v1/models/served/update", json=update, headers=_bearer("nope"))
        _error(r, 401, "unauthorized")
        r = c.post("/v1/models/served/update", json=update, headers=_bearer("w-key"))
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
    assert "binding 127.0.0.1 only" not in server.log_text()
    assert "0.0.0.0" in server.log_text()
    other = _non_loopback_ipv4()
    if other is not None:  # with keys it listens on every interface
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            assert s.connect_ex((other, server.port)) == 0, f"not reachable on {other}"


def _non_loopback_ipv4() -> str | None:
    """An address of this machine other than 127.x, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address: str = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_without_keys_the_server_binds_loopback_only(make_server: MakeServer) -> None:
    server = make_server(args=["--host", "0.0.0.0"])
    log = server.log_text()
    assert "no API keys configured" in log
    assert "binding 127.0.0.1 only, not 0.0.0.0" in log
    assert f"http://127.0.0.1:{server.port}" in log
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/healthz").status_code == 200
        r = c.post("/v1/models", json=SPEC)  # open: no keys configured
        assert r.status_code == 201, r.text
        assert c.get("/v1/models/guarded").json()["version"] == 0
    other = _non_loopback_ipv4()
    if other is not None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            assert s.connect_ex((other, server.port)) != 0, f"reachable on {other}"
