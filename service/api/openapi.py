"""The OpenAPI document, told true: the errors each operation answers, and nothing it does not.

* :func:`errors` is the ``responses=`` of a route: for each error code it can answer, its status,
  the one error body ``{"error": {"code", "message"}}`` (:class:`~service.schemas.ErrorResponse`)
  and an example with a real message. The statuses come from the table in
  :mod:`service.api.errors`, so the document and the answers cannot disagree.
* :func:`document` is the app's ``openapi()``: FastAPI's document, less the ``422
  HTTPValidationError`` (``{"detail": [...]}``) it lists for every route with parameters, which
  this service never sends; with the model name's pattern and example on every ``{name}``; links
  from a created model to the operations on it; and, only when API keys are configured, the
  bearer scheme with each route's scope and its 401 and 403 answers (without keys no route
  answers either).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api.auth import needed_scope
from service.api.errors import STATUS
from service.schemas import NAME_PATTERN, ErrorResponse

__all__ = ["DESCRIPTION", "ERRORS", "Error", "document", "errors", "status_of"]

DESCRIPTION = (
    "Postserve keeps a Bayesian posterior per hosted model and updates it with each observation "
    "as it arrives (one Kalman-filter step per row). Bodies are JSON. Every error is "
    '`{"error": {"code", "message"}}` with a 4xx or 5xx status; `code` is stable, and each '
    "operation lists the ones it answers. A refused request changes nothing. A known path with "
    "another method answers 405 with `Allow`."
)

#: code -> (what it means, an example message as the service writes it)
ERRORS: dict[str, tuple[str, str]] = {
    "invalid_input": (
        "the body is not JSON or not of this shape, a number is NaN or infinite, or a row or "
        "label does not fit the model",
        "predict: row 0 of x has 2 values, the model takes 3",
    ),
    "invalid_spec": (
        "a spec that cannot be built",
        "device 'tpu' is not a device; use auto or one of cpu",
    ),
    "step_rejected": (
        "the step would make the posterior non-finite or not positive definite; the state is "
        "unchanged",
        "the step made the precision's diagonal non-positive",
    ),
    "unsupported_media_type": (
        "the body is not sent as JSON (content-type: application/json)",
        "the body must be JSON sent with content-type: application/json, got 'text/plain'",
    ),
    "too_large": (
        "over a configured limit: the body (POSTSERVE_MAX_BODY_BYTES), its rows "
        "(POSTSERVE_MAX_ROWS), samples (POSTSERVE_MAX_SAMPLES), the answer "
        "(POSTSERVE_MAX_ANSWER_NUMBERS) or the state (POSTSERVE_MAX_STATE_BYTES)",
        "20000 rows is over the limit of 10000 per request (POSTSERVE_MAX_ROWS)",
    ),
    "not_found": ("no model of that name", "no model named 'ctr-home'"),
    "already_exists": ("a model of that name exists", "a model named 'ctr-home' exists"),
    "limit_reached": (
        "a configured count is used up (POSTSERVE_MAX_MONITORED_MODELS, "
        "POSTSERVE_MAX_TOTAL_STATE_BYTES); nothing was created",
        "100 models already have monitor: true, the limit (POSTSERVE_MAX_MONITORED_MODELS); "
        "create this one without it",
    ),
    "not_owner": (
        "with POSTSERVE_STORE=redis: another replica holds the model's write lease; send the "
        "request there (the ingress routes by model name)",
        "model 'ctr-home' is being written by replica postserve-1; send updates there, or retry "
        "after its lease (10000 ms) lapses",
    ),
    "version_conflict": (
        "another writer got there first; nothing was written",
        "the log of 'ctr-home' is at version 12, got 12; nothing was written",
    ),
    "store_unavailable": (
        "the store could not make the write durable; nothing was applied, retry",
        "redis unreachable: Error 111 connecting to 127.0.0.1:6379. Connection refused.",
    ),
    "not_ready": (
        "the models are still being restored at start (see /readyz)",
        "models are still being restored",
    ),
    "unauthorized": (
        "no API key, or an unknown one (only when POSTSERVE_API_KEYS is set)",
        "missing API key: send 'Authorization: Bearer KEY'",
    ),
    "forbidden": (
        "the key lacks the scope this route needs (only when POSTSERVE_API_KEYS is set)",
        "this API key lacks the 'admin' scope this route needs",
    ),
}
#: statuses of the answers no exception class stands for (api/errors.py's refusal)
_OTHER_STATUS = {"unsupported_media_type": 415}
_TITLES = {
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    413: "Too large",
    415: "Unsupported media type",
    422: "Refused",
    503: "Unavailable",
}
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def status_of(code: str) -> int:
    """The status a code is answered with (the table of :mod:`service.api.errors`)."""
    for cls, status in STATUS:
        if cls.code == code:
            return status
    return _OTHER_STATUS[code]


Error = str | tuple[str, str]


def _responses(items: Iterable[Error], model: bool) -> dict[int, dict[str, Any]]:
    """The error responses of ``items`` (a code, or (code, example message)), by status."""
    out: dict[int, dict[str, Any]] = {}
    for item in items:
        code, message = (item, ERRORS[item][1]) if isinstance(item, str) else item
        status = status_of(code)
        entry = out.setdefault(status, {"description": {}, "examples": {}})
        entry["description"].setdefault(code, ERRORS[code][0])
        key = code if code not in entry["examples"] else f"{code}_{len(entry['examples'])}"
        value = {"error": {"code": code, "message": message}}
        entry["examples"][key] = {"summary": code, "value": value}
    for status, entry in sorted(out.items()):
        meanings = "; ".join(f"`{c}`: {m}" for c, m in entry["description"].items())
        media: dict[str, Any] = {"examples": entry["examples"]}
        if not model:
            media["schema"] = ERROR_REF
        out[status] = {
            "description": f"{_TITLES.get(status, 'Error')}. {meanings}.",
            "content": {"application/json": media},
            **({"model": ErrorResponse} if model else {}),
        }
    return out


def errors(*items: Error) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses=``: every error it answers, each a code or (code, example)."""
    return {status: response for status, response in sorted(_responses(items, model=True).items())}


# -- the document ----------------------------------------------------------------------------

_NAME_DESCRIPTION = (
    "The model's name. Names match the pattern; any other is simply not a model here (404)."
)


def _operations(doc: dict[str, Any]) -> Iterable[tuple[str, str, dict[str, Any]]]:
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            yield path, method, operation


def _drop_validation_errors(doc: dict[str, Any]) -> None:
    """Remove FastAPI's default ``422 HTTPValidationError``: every refusal is an ErrorResponse."""
    ref = "#/components/schemas/HTTPValidationError"
    for _, _, operation in _operations(doc):
        responses = operation.get("responses", {})
        schema = responses.get("422", {}).get("content", {}).get("application/json", {})
        if schema.get("schema", {}).get("$ref") == ref:
            del responses["422"]
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _document_names(doc: dict[str, Any], examples: dict[str, str]) -> None:
    """The ``{name}`` path parameter: its pattern, meaning and example (``examples`` by
    operation id, else the first value)."""
    default = next(iter(examples.values()))
    for _, _, operation in _operations(doc):
        for parameter in operation.get("parameters", []):
            if parameter.get("in") == "path" and parameter.get("name") == "name":
                parameter["description"] = _NAME_DESCRIPTION
                parameter["schema"] = {"type": "string", "pattern": NAME_PATTERN}
                parameter["example"] = examples.get(operation.get("operationId", ""), default)
            elif "examples" in parameter and "example" not in parameter:  # a query parameter's
                parameter["example"] = next(iter(parameter.pop("examples").values()))["value"]


def _link_created_model(doc: dict[str, Any], create: str) -> None:
    """Links from the 201 of ``create`` to the operations on ``/v1/models/{name}...`` that need
    nothing but the model (a reward needs an event of ``/decide`` too)."""
    links: dict[str, Any] = {}
    created: dict[str, Any] | None = None
    for path, _, operation in _operations(doc):
        op_id = operation.get("operationId", "")
        if op_id == create:
            created = operation["responses"]["201"]
        elif path.startswith("/v1/models/{name}") and "/reward" not in path:
            links[op_id] = {"operationId": op_id, "parameters": {"name": "$response.body#/name"}}
    if created is not None and links:
        created["links"] = links


def _document_keys(doc: dict[str, Any]) -> None:
    """The bearer scheme; on each route that needs a key, its scope, 401 and (for a route of
    one scope) 403."""
    doc.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A key of POSTSERVE_API_KEYS: `Authorization: Bearer KEY`.",
    }
    for path, method, operation in _operations(doc):
        scope = needed_scope(method.upper(), path)
        if scope is None:
            continue
        operation["security"] = [{"apiKey": []}]
        items: list[Error] = ["unauthorized"]
        if scope is True:
            need = "Needs an API key (any scope)."
        else:
            need = f"Needs an API key with the `{scope}` scope."
            message = f"this API key lacks the {scope!r} scope this route needs"
            items.append(("forbidden", message))
        operation["description"] = f"{operation.get('description', '')}\n\n{need}".strip()
        for status, response in _responses(items, model=False).items():
            if status == 401:
                header = {"description": "`Bearer`", "schema": {"type": "string"}}
                response["headers"] = {"WWW-Authenticate": header}
            operation.setdefault("responses", {})[str(status)] = response
        operation["responses"] = dict(sorted(operation["responses"].items()))


def document(
    app: FastAPI, *, keys: bool, names: dict[str, str], create: str
) -> Callable[[], dict[str, Any]]:
    """The app's ``openapi()`` (built once): ``keys`` says whether API keys are configured,
    ``names`` gives the ``{name}`` example by operation id, ``create`` is the operation id
    whose 201 links to the model's operations."""
    auth = (
        "API keys are configured: each `/v1` route needs `Authorization: Bearer KEY` with a key "
        "of the scope it names (401 without a valid key, 403 without the scope)."
        if keys
        else "No API keys are configured (POSTSERVE_API_KEYS): every route is open, and no "
        "route answers 401 or 403."
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=f"{app.description}\n\n{auth}",
                routes=app.routes,
                tags=app.openapi_tags,
            )
            _drop_validation_errors(doc)
            _document_names(doc, names)
            _link_created_model(doc, create)
            if keys:
                _document_keys(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    return openapi
