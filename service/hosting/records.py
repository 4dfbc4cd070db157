"""The records the engine writes to its store, typed; their bytes are JSON.

The byte layout is the store format (snapshots and logs written by earlier versions must keep
restoring), so each record reads and writes exactly these keys (written by orjson, compact,
over 10x faster than the json module on rows of numbers; read by either):

=============  ============================================================================
log entry      ``{"x": rows, "y": labels, "request_id": str | null, "kernel"?: str,
               "outputs"?: [int]}``: one ``/update`` (or one batch of rewards), applied as
               ``len(x)`` filtering steps; ``kernel`` names the compiled step that computed it
               (absent: the eager step); ``outputs`` the output each row observes alone
               (absent: every output)
event          ``{"x", "action", "propensity", "strategy", "version", "response",
               "output"?: int}``: one ``/decide``; ``x`` the chosen action's input row (the
               context, when the arms are the model's outputs: then ``output`` is the chosen
               one), ``response`` the JSON answer given (returned again to a retried decision)
=============  ============================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from service.components import Label

__all__ = ["EventRecord", "LogEntry"]


def _loads(raw: bytes) -> dict[str, Any]:
    """A record's JSON: written by orjson (compact; floats as their shortest repr, which read back
    to the same doubles) or by the json module of earlier versions, which orjson reads too but
    for numbers beyond 64-bit integers, left to json."""
    try:
        body: dict[str, Any] = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = json.loads(raw)
    return body


@dataclass(frozen=True)
class LogEntry:
    x: list[list[float]]
    y: list[Label]
    request_id: str | None
    kernel: str | None = None  # the compiled step that computed it; None: the eager step
    outputs: list[int] | None = None  # the output each row observes alone; None: all

    def to_bytes(self) -> bytes:
        body: dict[str, object] = {"x": self.x, "y": self.y, "request_id": self.request_id}
        if self.kernel is not None:
            body["kernel"] = self.kernel
        if self.outputs is not None:
            body["outputs"] = self.outputs
        return orjson.dumps(body)

    @classmethod
    def from_bytes(cls, raw: bytes) -> LogEntry:
        body = _loads(raw)
        return cls(
            body["x"], body["y"], body.get("request_id"), body.get("kernel"), body.get("outputs")
        )


@dataclass(frozen=True)
class EventRecord:
    x: list[float]
    action: int
    propensity: float
    strategy: str
    version: int
    response: str
    output: int | None = None  # the chosen output, when the arms are the model's outputs

    def to_bytes(self) -> bytes:
        # The fields by hand, in their order: ``asdict`` deep-copies every number of x.
        body: dict[str, object] = {
            "x": self.x, "action": self.action, "propensity": self.propensity,
            "strategy": self.strategy, "version": self.version, "response": self.response,
        }  # fmt: skip
        if self.output is not None:
            body["output"] = self.output
        return orjson.dumps(body)

    @classmethod
    def from_bytes(cls, raw: bytes) -> EventRecord:
        body = _loads(raw)
        return cls(
            body["x"], body["action"], body["propensity"], body["strategy"], body["version"],
            body["response"], body.get("output"),
        )  # fmt: skip
