"""The records the engine writes to its store, typed; their bytes are JSON.

The byte layout is the store format (snapshots and logs written by earlier versions must keep
restoring), so each record reads and writes exactly these keys:

=============  ============================================================================
log entry      ``{"x": rows, "y": labels, "request_id": str | null}``: one ``/update`` (or one
               reward), applied as ``len(x)`` filtering steps
event          ``{"x", "action", "propensity", "strategy", "version", "response"}``: one
               ``/decide``; ``x`` the chosen action's input row, ``response`` the JSON answer
               given (returned again to a retried decision)
=============  ============================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from service.components import Label

__all__ = ["EventRecord", "LogEntry"]


@dataclass(frozen=True)
class LogEntry:
    x: list[list[float]]
    y: list[Label]
    request_id: str | None

    def to_bytes(self) -> bytes:
        return json.dumps({"x": self.x, "y": self.y, "request_id": self.request_id}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LogEntry:
        body = json.loads(raw)
        return cls(x=body["x"], y=body["y"], request_id=body.get("request_id"))


@dataclass(frozen=True)
class EventRecord:
    x: list[float]
    action: int
    propensity: float
    strategy: str
    version: int
    response: str

    def to_bytes(self) -> bytes:
        # The fields by hand, in their order: ``asdict`` deep-copies every number of x.
        body = {
            "x": self.x, "action": self.action, "propensity": self.propensity,
            "strategy": self.strategy, "version": self.version, "response": self.response,
        }  # fmt: skip
        return json.dumps(body).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> EventRecord:
        body = json.loads(raw)
        return cls(**{k: body[k] for k in cls.__dataclass_fields__})
