"""API keys with scopes, sent as ``Authorization: Bearer KEY`` and compared in constant time.

Scopes: ``read`` (predict, get, list), ``write`` (update), ``admin`` (create, delete, snapshot).
A key holds exactly the scopes it is listed with (a key may be listed once per scope). With no
keys configured, every route is open and the server binds 127.0.0.1 only (see the CLI).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Request

from service.config import Scope
from service.errors import Forbidden, Unauthorized

__all__ = ["Keyring", "require"]


class Keyring:
    def __init__(self, pairs: list[tuple[str, Scope]]) -> None:
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


def require(scope: Scope) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        keyring: Keyring = request.app.state.keyring
        if not keyring.enabled:
            return
        header = request.headers.get("authorization", "")
        kind, _, key = header.partition(" ")
        if kind.lower() != "bearer" or not key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer KEY'")
        scopes = keyring.scopes(key.strip())
        if scopes is None:
            raise Unauthorized("unknown API key")
        if scope not in scopes:
            raise Forbidden(f"this API key lacks the {scope!r} scope this route needs")

    return check
