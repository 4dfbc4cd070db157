"""API keys with scopes, sent as ``Authorization: Bearer KEY`` and compared in constant time.

Scopes: ``read`` (predict, get, list, calibration, influence), ``write`` (update, decide, reward and their batches), ``admin`` (create, delete, snapshot).
A key holds exactly the scopes it is listed with (a key may be listed once per scope). With no
keys configured every route is open, and the CLI binds 127.0.0.1 only.

Authentication is an ASGI middleware over the table :data:`RULES`, so a request without a valid
key is refused (401/403) before its body is read or parsed. ``/healthz``, ``/readyz`` and
``/metrics`` are open (metrics name only models created with ``"monitor": true``);
any other ``/v1`` path needs a valid key of some scope. The Open Inference Protocol's routes
(``/v2``) follow the same rules: its health routes are open, metadata and ``infer`` need
``read``, and its refusals are the protocol's ``{"error": "<message>"}``.
"""

from __future__ import annotations

import hmac
import re

import orjson
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import response_for
from service.config import Scope as KeyScope
from service.errors import Forbidden, Unauthorized

__all__ = ["RULES", "Authenticate", "Keyring"]

_MODEL = r"/v1/models/[^/]+"

#: (method, path regex, scope needed), first match wins.
RULES: list[tuple[str, re.Pattern[str], KeyScope]] = [
    ("POST", re.compile(r"^/v1/models/?$"), "admin"),
    ("GET", re.compile(r"^/v1/models/?$"), "read"),
    ("GET", re.compile(rf"^{_MODEL}/?$"), "read"),
    ("DELETE", re.compile(rf"^{_MODEL}/?$"), "admin"),
    ("POST", re.compile(rf"^{_MODEL}/update$"), "write"),
    ("POST", re.compile(rf"^{_MODEL}/decide(/batch)?$"), "write"),
    ("POST", re.compile(rf"^{_MODEL}/reward(/batch)?$"), "write"),
    ("POST", re.compile(rf"^{_MODEL}/predict$"), "read"),
    ("GET", re.compile(rf"^{_MODEL}/calibration$"), "read"),
    ("GET", re.compile(rf"^{_MODEL}/influence$"), "read"),
    ("POST", re.compile(rf"^{_MODEL}/snapshot$"), "admin"),
    # the Open Inference Protocol (``service.api.oip``): metadata and infer read
    ("GET", re.compile(r"^/v2/?$"), "read"),
    ("GET", re.compile(r"^/v2/models/[^/]+(/ready)?/?$"), "read"),
    ("POST", re.compile(r"^/v2/models/[^/]+/infer$"), "read"),
]
#: open, as ``/healthz`` and ``/readyz``: the protocol's liveness and readiness
OPEN = re.compile(r"^/v2/health/(live|ready)$")


def _oip(response: Response) -> Response:
    """A refusal in the Open Inference Protocol's form, headers (``WWW-Authenticate``) kept."""
    message = orjson.loads(response.body)["error"]["message"]
    out = Response(orjson.dumps({"error": message}), response.status_code)
    out.headers.update({k: v for k, v in response.headers.items() if k == "www-authenticate"})
    out.headers["content-type"] = "application/json"
    return out


class Keyring:
    def __init__(self, pairs: list[tuple[str, KeyScope]]) -> None:
        self._pairs = [(k.encode(), s) for k, s in pairs]

    @property
    def enabled(self) -> bool:
        return bool(self._pairs)

    def scopes(self, key: str) -> set[str] | None:
        """The key's scopes, or None for an unknown key. Every entry is compared."""
        given = key.encode()
        found: set[str] = set()
        known = False
        for k, scope in self._pairs:
            if hmac.compare_digest(given, k):
                known = True
                found.add(scope)
        return found if known else None


def needed_scope(method: str, path: str) -> KeyScope | bool | None:
    """The scope a request needs; True for 'any valid key', None for an open route."""
    for rule_method, pattern, scope in RULES:
        if rule_method == method and pattern.match(path):
            return scope
    if OPEN.match(path):
        return None
    return True if path.startswith(("/v1/", "/v2/")) or path in ("/v1", "/v2") else None


class Authenticate:
    def __init__(self, app: ASGIApp, keyring: Keyring) -> None:
        self.app, self.keyring = app, keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keyring.enabled:
            await self.app(scope, receive, send)
            return
        need = needed_scope(scope["method"], scope["path"])
        if need is None:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        kind, _, key = header.partition(" ")
        if kind.lower() != "bearer" or not key.strip():
            response = response_for(
                Unauthorized("missing API key: send 'Authorization: Bearer KEY'")
            )
        elif (scopes := self.keyring.scopes(key.strip())) is None:
            response = response_for(Unauthorized("unknown API key"))
        elif need is not True and need not in scopes:
            response = response_for(
                Forbidden(f"this API key lacks the {need!r} scope this route needs")
            )
        else:
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith("/v2"):  # the protocol's error: {"error": "<message>"}
            await _oip(response)(scope, receive, send)
            return
        await response(scope, receive, send)
