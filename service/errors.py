"""Postserve's exception hierarchy.

Every error carries a stable ``code`` (a short snake_case string) that clients may match on; the HTTP
layer maps each class to a status in one table, so nothing else needs to know about HTTP.

::

    PostserveError
    ├── InvalidInput            bad shapes, non-finite numbers, labels outside the likelihood's support
    │   └── TooLarge            a body, a batch of rows or a model state over a configured limit
    ├── InvalidSpec             a model specification that cannot be built
    ├── StepRejected            a filtering step produced a non-finite or non-PSD posterior;
    │                           the previous state is untouched and stays current
    ├── NotFound                no model of that name
    ├── AlreadyExists           a model of that name exists
    ├── LimitReached            a configured count is used up (monitored models)
    ├── StoreUnavailable        the store could not make a write durable; nothing was applied
    ├── VersionConflict         a log record at or below the log's latest version: another writer
    │                           got there first; nothing was written
    ├── NotOwner                another replica holds the model's write lease
    ├── NotReady                models are still being restored
    ├── Unauthorized            no or unknown API key
    └── Forbidden               a valid key without the scope the route needs
"""

from __future__ import annotations

__all__ = [
    "AlreadyExists",
    "Forbidden",
    "InvalidInput",
    "InvalidSpec",
    "LimitReached",
    "NotFound",
    "NotOwner",
    "NotReady",
    "PostserveError",
    "StepRejected",
    "StoreUnavailable",
    "TooLarge",
    "Unauthorized",
    "VersionConflict",
]


class PostserveError(Exception):
    """Base class. ``code`` is stable; ``message`` is for people."""

    code: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(PostserveError):
    """An observation or query the model cannot take (shape, dtype, non-finite value, label)."""

    code = "invalid_input"


class InvalidSpec(PostserveError):
    """A network / likelihood / filter / prior / dynamics combination that cannot be built."""

    code = "invalid_spec"


class StepRejected(PostserveError):
    """A step whose result is not a valid Gaussian belief (non-finite, or not positive definite).

    ``reason`` is one of ``"non_finite"`` or ``"not_psd"``.
    """

    code = "step_rejected"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TooLarge(InvalidInput):
    """A request body, a batch of rows or a model's state over a configured limit."""

    code = "too_large"


class NotFound(PostserveError):
    code = "not_found"


class AlreadyExists(PostserveError):
    code = "already_exists"


class LimitReached(PostserveError):
    """A configured count is used up: nothing was created."""

    code = "limit_reached"


class StoreUnavailable(PostserveError):
    """The store did not acknowledge a write; the update was not applied."""

    code = "store_unavailable"


class VersionConflict(PostserveError):
    """A log record at or below the log's latest version: another writer got there first;
    nothing was written."""

    code = "version_conflict"


class NotReady(PostserveError):
    code = "not_ready"


class Unauthorized(PostserveError):
    code = "unauthorized"


class Forbidden(PostserveError):
    code = "forbidden"


class NotOwner(PostserveError):
    """Another replica holds this model's write lease (or this one lost it); nothing was applied."""

    code = "not_owner"
