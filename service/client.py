"""Python clients for Postserve: :class:`Client` (sync) and :class:`AsyncClient` (httpx).

Both share the request building (:class:`_Calls`) and the response parsing (:func:`_parse`); each
method is one line per client. Errors come back as :class:`PostserveHTTPError` carrying the
server's status, ``code`` and ``message``::

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        client.update("ctr", x=[[0.1, 0.2]], y=[1]).version

Bodies are written with pydantic-core's JSON encoder (several times faster than ``json`` on
long lists of numbers, and writing NaN and infinities as ``json`` does, for the server to refuse).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
from pydantic import BaseModel
from pydantic_core import to_json

from service.schemas import (
    CalibrationResponse,
    DecideBatchResponse,
    DecideRequest,
    DecideResponse,
    InfluenceResponse,
    ModelInfo,
    ModelList,
    ModelSpec,
    PredictResponse,
    RewardBatchResponse,
    RewardResponse,
    SnapshotResponse,
    UpdateResponse,
)

__all__ = ["AsyncClient", "Client", "PostserveHTTPError"]

R = TypeVar("R", bound=BaseModel)
#: One item of a decide batch: a ``/decide`` body (``actions``, and optionally ``context``,
#: ``strategy``, ``epsilon``, ``event_id``, ``seed``; arrays are fine) or a DecideRequest.
DecideItem = Mapping[str, Any] | DecideRequest


class PostserveHTTPError(Exception):
    """A non-2xx answer: ``status`` (HTTP), ``code`` (stable) and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    body: dict[str, Any] | None = None


class _Calls:
    """Request building shared by both clients."""

    @staticmethod
    def create(spec: ModelSpec | dict[str, Any]) -> _Call:
        body = spec.model_dump(exclude_none=True) if isinstance(spec, ModelSpec) else spec
        return _Call("POST", "/v1/models", body)

    @staticmethod
    def list(limit: int | None = None, after: str | None = None) -> _Call:
        query = {k: v for k, v in (("limit", limit), ("after", after)) if v is not None}
        return _Call("GET", "/v1/models" + (f"?{urlencode(query)}" if query else ""))

    @staticmethod
    def get(name: str) -> _Call:
        return _Call("GET", f"/v1/models/{name}")

    @staticmethod
    def delete(name: str) -> _Call:
        return _Call("DELETE", f"/v1/models/{name}")

    @staticmethod
    def update(
        name: str, x: Any, y: Any, request_id: str | None, outputs: Any, dt: Any = None
    ) -> _Call:
        body: dict[str, Any] = {"y": _list(y)}
        if x is not None:
            body["x"] = _rows(x)
        if dt is not None:
            body["dt"] = [float(v) for v in _list(dt)]
        if request_id is not None:
            body["request_id"] = request_id
        if outputs is not None:
            body["outputs"] = [int(k) for k in _list(outputs)]
        return _Call("POST", f"/v1/models/{name}/update", body)

    @staticmethod
    def predict(
        name: str, x: Any, num_samples: int, seed: int | None, variance: bool, dt: Any = None
    ) -> _Call:
        body: dict[str, Any] = {"num_samples": num_samples}
        if x is not None:
            body["x"] = _rows(x)
        if dt is not None:
            body["dt"] = [float(v) for v in _list(dt)]
        if seed is not None:
            body["seed"] = seed
        if not variance:
            body["variance"] = False
        return _Call("POST", f"/v1/models/{name}/predict", body)

    @staticmethod
    def snapshot(name: str) -> _Call:
        return _Call("POST", f"/v1/models/{name}/snapshot")

    @staticmethod
    def decide(
        name: str,
        actions: Any,
        context: Any,
        strategy: str,
        epsilon: float,
        event_id: str | None,
        seed: int | None,
    ) -> _Call:
        body = {
            "actions": actions, "context": context, "strategy": strategy, "epsilon": epsilon,
            "event_id": event_id, "seed": seed,
        }  # fmt: skip
        return _Call("POST", f"/v1/models/{name}/decide", _decide_body(body))

    @staticmethod
    def reward(name: str, event_id: str, reward: float) -> _Call:
        return _Call("POST", f"/v1/models/{name}/reward", {"event_id": event_id, "reward": reward})

    @staticmethod
    def decide_batch(name: str, items: Iterable[DecideItem]) -> _Call:
        body = {"items": [_decide_body(item) for item in items]}
        return _Call("POST", f"/v1/models/{name}/decide/batch", body)

    @staticmethod
    def reward_batch(name: str, rewards: Iterable[tuple[str, float]]) -> _Call:
        items = [{"event_id": e, "reward": float(r)} for e, r in rewards]
        return _Call("POST", f"/v1/models/{name}/reward/batch", {"items": items})

    @staticmethod
    def calibration(name: str) -> _Call:
        return _Call("GET", f"/v1/models/{name}/calibration")

    @staticmethod
    def influence(name: str, top: int) -> _Call:
        return _Call("GET", f"/v1/models/{name}/influence?top={int(top)}")


def _list(v: Any) -> Any:
    return v.tolist() if hasattr(v, "tolist") else list(v)


def _rows(x: Any) -> Any:
    return x.tolist() if hasattr(x, "tolist") else [_list(r) for r in x]


def _decide_body(item: DecideItem) -> dict[str, Any]:
    """A ``/decide`` body without its unset fields, arrays as lists."""
    if isinstance(item, DecideRequest):
        return item.model_dump(exclude_none=True)
    body = {k: v for k, v in item.items() if v is not None}
    if "actions" in body:
        body["actions"] = _rows(body["actions"])
    if "context" in body:
        body["context"] = _list(body["context"])
    return body


def _content(call: _Call) -> dict[str, Any]:
    """httpx's ``content`` and ``headers`` for the call's JSON body, if it has one."""
    if call.body is None:
        return {}
    return {
        "content": to_json(call.body, inf_nan_mode="constants"),
        "headers": {"Content-Type": "application/json"},
    }


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _check(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500]
    raise PostserveHTTPError(response.status_code, code, message)


def _parse(response: httpx.Response, model: type[R]) -> R:
    _check(response)
    return model.model_validate_json(response.content)


class Client:
    """Synchronous client. Use as a context manager or call ``close()``."""

    def __init__(
        self, base_url: str, api_key: str | None = None, timeout: float = 30.0, **kw: Any
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, **kw
        )

    def _send(self, call: _Call) -> httpx.Response:
        return self._http.request(call.method, call.path, **_content(call))

    def create_model(self, spec: ModelSpec | dict[str, Any]) -> ModelInfo:
        return _parse(self._send(_Calls.create(spec)), ModelInfo)

    def list_models(self, limit: int | None = None, after: str | None = None) -> list[ModelInfo]:
        """The models by name: all, or (``limit``) a page of those after ``after``; the next
        page follows the last name of this one."""
        return _parse(self._send(_Calls.list(limit, after)), ModelList).models

    def get_model(self, name: str) -> ModelInfo:
        return _parse(self._send(_Calls.get(name)), ModelInfo)

    def delete_model(self, name: str) -> None:
        _check(self._send(_Calls.delete(name)))

    def update(
        self,
        name: str,
        x: Any,
        y: Any,
        request_id: str | None = None,
        outputs: Any = None,
        dt: Any = None,
    ) -> UpdateResponse:
        """Apply rows ``x``, ``y``; with ``outputs`` (one index per row), row i's y observes
        output ``outputs[i]`` alone. A state-space model takes ``x=None`` and ``dt``, each
        row's time step (``docs/algorithms.md`` 3.11)."""
        call = _Calls.update(name, x, y, request_id, outputs, dt)
        return _parse(self._send(call), UpdateResponse)

    def predict(
        self,
        name: str,
        x: Any,
        num_samples: int = 0,
        seed: int | None = None,
        variance: bool = True,
        dt: Any = None,
    ) -> PredictResponse:
        call = _Calls.predict(name, x, num_samples, seed, variance, dt)
        return _parse(self._send(call), PredictResponse)

    def snapshot(self, name: str) -> SnapshotResponse:
        return _parse(self._send(_Calls.snapshot(name)), SnapshotResponse)

    def calibration(self, name: str) -> CalibrationResponse:
        return _parse(self._send(_Calls.calibration(name)), CalibrationResponse)

    def influence(self, name: str, top: int = 10) -> InfluenceResponse:
        """The ``top`` rows of the model's recent window that moved it most, largest first."""
        return _parse(self._send(_Calls.influence(name, top)), InfluenceResponse)

    def decide(
        self,
        name: str,
        actions: Any = None,
        context: Any = None,
        strategy: str = "thompson",
        epsilon: float = 0.1,
        event_id: str | None = None,
        seed: int | None = None,
    ) -> DecideResponse:
        """Choose an action (rows of ``actions``, each after the shared ``context``), or,
        without ``actions``, one of the model's outputs (the arms) for ``context``."""
        call = _Calls.decide(name, actions, context, strategy, epsilon, event_id, seed)
        return _parse(self._send(call), DecideResponse)

    def reward(self, name: str, event_id: str, reward: float) -> RewardResponse:
        """Post the reward of a decision (at most once per event; rewards are maximised)."""
        return _parse(self._send(_Calls.reward(name, event_id, float(reward))), RewardResponse)

    def decide_batch(self, name: str, items: Iterable[DecideItem]) -> list[DecideResponse]:
        """Decide each item (a ``/decide`` body) against the same state, one event each."""
        return _parse(self._send(_Calls.decide_batch(name, items)), DecideBatchResponse).items

    def reward_batch(self, name: str, rewards: Iterable[tuple[str, float]]) -> list[RewardResponse]:
        """Post ``(event_id, reward)`` pairs as one update, in order; all or nothing."""
        return _parse(self._send(_Calls.reward_batch(name, rewards)), RewardBatchResponse).items

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """Asynchronous client (``async with AsyncClient(url) as c: await c.update(...)``)."""

    def __init__(
        self, base_url: str, api_key: str | None = None, timeout: float = 30.0, **kw: Any
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, **kw
        )

    async def _send(self, call: _Call) -> httpx.Response:
        return await self._http.request(call.method, call.path, **_content(call))

    async def create_model(self, spec: ModelSpec | dict[str, Any]) -> ModelInfo:
        return _parse(await self._send(_Calls.create(spec)), ModelInfo)

    async def list_models(
        self, limit: int | None = None, after: str | None = None
    ) -> list[ModelInfo]:
        return _parse(await self._send(_Calls.list(limit, after)), ModelList).models

    async def get_model(self, name: str) -> ModelInfo:
        return _parse(await self._send(_Calls.get(name)), ModelInfo)

    async def delete_model(self, name: str) -> None:
        _check(await self._send(_Calls.delete(name)))

    async def update(
        self,
        name: str,
        x: Any,
        y: Any,
        request_id: str | None = None,
        outputs: Any = None,
        dt: Any = None,
    ) -> UpdateResponse:
        call = _Calls.update(name, x, y, request_id, outputs, dt)
        return _parse(await self._send(call), UpdateResponse)

    async def predict(
        self,
        name: str,
        x: Any,
        num_samples: int = 0,
        seed: int | None = None,
        variance: bool = True,
        dt: Any = None,
    ) -> PredictResponse:
        call = _Calls.predict(name, x, num_samples, seed, variance, dt)
        return _parse(await self._send(call), PredictResponse)

    async def snapshot(self, name: str) -> SnapshotResponse:
        return _parse(await self._send(_Calls.snapshot(name)), SnapshotResponse)

    async def calibration(self, name: str) -> CalibrationResponse:
        return _parse(await self._send(_Calls.calibration(name)), CalibrationResponse)

    async def influence(self, name: str, top: int = 10) -> InfluenceResponse:
        return _parse(await self._send(_Calls.influence(name, top)), InfluenceResponse)

    async def decide(
        self,
        name: str,
        actions: Any = None,
        context: Any = None,
        strategy: str = "thompson",
        epsilon: float = 0.1,
        event_id: str | None = None,
        seed: int | None = None,
    ) -> DecideResponse:
        call = _Calls.decide(name, actions, context, strategy, epsilon, event_id, seed)
        return _parse(await self._send(call), DecideResponse)

    async def reward(self, name: str, event_id: str, reward: float) -> RewardResponse:
        return _parse(
            await self._send(_Calls.reward(name, event_id, float(reward))), RewardResponse
        )

    async def decide_batch(self, name: str, items: Iterable[DecideItem]) -> list[DecideResponse]:
        call = _Calls.decide_batch(name, items)
        return _parse(await self._send(call), DecideBatchResponse).items

    async def reward_batch(
        self, name: str, rewards: Iterable[tuple[str, float]]
    ) -> list[RewardResponse]:
        call = _Calls.reward_batch(name, rewards)
        return _parse(await self._send(call), RewardBatchResponse).items

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
