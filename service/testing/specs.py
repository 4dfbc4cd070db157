"""Builders of the JSON body of ``POST /v1/models`` (plain dicts, as a client sends them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["JSONObject", "linear_spec", "mlp_spec"]

#: a JSON object as Python builds it
JSONObject = dict[str, Any]


def _typed(value: str | JSONObject) -> JSONObject:
    return {"type": value} if isinstance(value, str) else value


def linear_spec(
    name: str,
    input_dim: int,
    output_dim: int | None = None,
    *,
    bias: bool | None = None,
    likelihood: str | JSONObject = "gaussian",
    filter: str | JSONObject | None = None,
    **fields: object,
) -> JSONObject:
    """The body of ``POST /v1/models`` for a linear network. ``likelihood`` and ``filter`` are a
    type name or the whole object; the server's defaults hold for what is not given (``output_dim``
    1, a bias, LoFi); other fields (``prior``, ``dtype``, ...) go in as they are."""
    network: JSONObject = {"type": "linear", "input_dim": input_dim}
    if output_dim is not None:
        network["output_dim"] = output_dim
    if bias is not None:
        network["bias"] = bias
    return _spec(name, network, likelihood, filter, fields)


def mlp_spec(
    name: str,
    input_dim: int,
    hidden: Sequence[int],
    output_dim: int | None = None,
    *,
    activation: str | None = None,
    likelihood: str | JSONObject = "gaussian",
    filter: str | JSONObject | None = None,
    **fields: object,
) -> JSONObject:
    """:func:`linear_spec` for a multi-layer perceptron with the given hidden widths."""
    network: JSONObject = {"type": "mlp", "input_dim": input_dim, "hidden": list(hidden)}
    if output_dim is not None:
        network["output_dim"] = output_dim
    if activation is not None:
        network["activation"] = activation
    return _spec(name, network, likelihood, filter, fields)


def _spec(
    name: str,
    network: JSONObject,
    likelihood: str | JSONObject,
    filter: str | JSONObject | None,
    fields: dict[str, object],
) -> JSONObject:
    spec: JSONObject = {"name": name, "network": network, "likelihood": _typed(likelihood)}
    if filter is not None:
        spec["filter"] = _typed(filter)
    return {**spec, **fields}
