"""The building blocks of the request and spec models: a strict frozen base, finiteness checks.

Shared by :mod:`service.schemas` (the HTTP contract) and the spec classes of the extension
points (:mod:`service.components`).
"""

from __future__ import annotations

import math
from typing import Annotated, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo

__all__ = ["Integer", "Strict", "all_finite", "finite", "finite_field"]

T = TypeVar("T")


class Strict(BaseModel):
    """Unknown fields are refused; instances are immutable. Values are taken as the JSON schema
    types them, with no coercion: a boolean is ``true`` or ``false`` (not 1 or ``"yes"``), a
    number is a JSON number (not ``"1.5"``), a string a string; integers are :data:`Integer`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _json_integer(value: object) -> object:
    if isinstance(value, bool | str):
        raise ValueError(f"Input should be a valid integer, got {value!r}")
    return value


#: An integer as JSON Schema has it: ``3`` or ``3.0`` (a number with no fraction), never
#: ``true`` or ``"3"``. For the int fields of :class:`Strict` models.
Integer = Annotated[int, Field(strict=False), BeforeValidator(_json_integer)]


def finite(value: float, what: str) -> float:
    """``value`` if finite, else ValueError naming ``what``."""
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def all_finite(values: object, what: str) -> None:
    """ValueError naming ``what`` if any float nested in ``values`` is NaN or infinite."""
    if _finite_sum(values):
        return
    stack = [values]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"NaN or infinite values are not allowed in {what}")


def _finite_sum(values: object) -> bool:
    """True when ``values`` is a list of numbers, or of lists of numbers, with a finite sum: then
    none is NaN or infinite (either would make the sum so). False says nothing (a nesting of
    another shape, or a sum that overflowed): the caller looks at every value."""
    try:
        if isinstance(values, list) and values and isinstance(values[0], list):
            return math.isfinite(sum(map(sum, values)))
        return isinstance(values, list) and math.isfinite(sum(values))
    except TypeError:  # not numbers all the way down
        return False


def finite_field(value: T, info: ValidationInfo) -> T:
    """A field validator: no NaN or infinity anywhere in the field's (nested) numbers."""
    all_finite(value, str(info.field_name))
    return value
