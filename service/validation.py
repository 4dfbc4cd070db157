"""The building blocks of the request and spec models: a strict frozen base, finiteness checks.

Shared by :mod:`service.schemas` (the HTTP contract) and the spec classes of the extension
points (:mod:`service.components`).
"""

from __future__ import annotations

import math
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationInfo

__all__ = ["Strict", "all_finite", "finite", "finite_field"]

T = TypeVar("T")


class Strict(BaseModel):
    """Unknown fields are refused; instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
