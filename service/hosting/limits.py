"""Admission: the configured limits a request or a new model must fit, checked before any work.

Each refusal names the setting behind it (``POSTSERVE_*``), so an operator knows what to raise.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.config import Settings
from service.errors import InvalidInput, LimitReached, TooLarge
from service.filters.networks import Network
from service.filters.statespace import StateSpace

__all__ = ["Limits", "input_rows"]


class Limits:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def rows(self, x: Sequence[Sequence[float]], input_dim: int, what: str) -> None:
        """At most ``max_rows`` rows, each of ``input_dim`` values."""
        if len(x) > self.settings.max_rows:
            raise TooLarge(
                f"{len(x)} rows is over the limit of {self.settings.max_rows} per request "
                "(POSTSERVE_MAX_ROWS)"
            )
        for i, row in enumerate(x):
            if len(row) != input_dim:
                raise InvalidInput(
                    f"{what}: row {i} of x has {len(row)} values, the model takes {input_dim}"
                )

    def batch(self, rows: int, what: str) -> None:
        """At most ``max_rows`` rows over all the items of a batch; ``what`` says how they count."""
        if rows > self.settings.max_rows:
            raise TooLarge(
                f"{rows} rows ({what}) is over the limit of {self.settings.max_rows} per request "
                "(POSTSERVE_MAX_ROWS)"
            )

    def samples(self, n: int) -> None:
        if n > self.settings.max_samples:
            raise TooLarge(
                f"num_samples {n} is over the limit of {self.settings.max_samples} "
                "(POSTSERVE_MAX_SAMPLES)"
            )

    def answer(self, rows: int, samples: int, outputs: int) -> None:
        """A ``/predict`` answer of rows x (4 moments + samples) x outputs numbers."""
        numbers = rows * (4 + samples) * outputs
        if numbers > self.settings.max_answer_numbers:
            raise TooLarge(
                f"{rows} rows x (4 + {samples} samples) x {outputs} outputs is {numbers} numbers, "
                f"over the limit of {self.settings.max_answer_numbers} per answer "
                "(POSTSERVE_MAX_ANSWER_NUMBERS); ask for fewer rows or samples per request"
            )

    def state(self, need: int) -> None:
        """A new model's state of ``need`` bytes."""
        if need > self.settings.max_state_bytes:
            raise TooLarge(
                f"the state of this model would take {need} bytes, over the limit of "
                f"{self.settings.max_state_bytes} (POSTSERVE_MAX_STATE_BYTES)"
            )

    def budget(self, hosted: int, need: int) -> None:
        """A new state of ``need`` bytes beside ``hosted`` bytes of states already held."""
        budget = self.settings.state_budget
        if hosted + need > budget:
            raise LimitReached(
                f"this model's state ({need} bytes) would take the states held by this process to "
                f"{hosted + need} bytes, over the budget of {budget} "
                "(POSTSERVE_MAX_TOTAL_STATE_BYTES); delete models or raise the budget"
            )

    def monitored(self, count: int) -> None:
        """One more model with ``monitor: true`` when ``count`` already have it."""
        if count >= self.settings.max_monitored_models:
            raise LimitReached(
                f"{self.settings.max_monitored_models} models already have monitor: true, the "
                "limit (POSTSERVE_MAX_MONITORED_MODELS); create this one without it"
            )


def input_rows(
    network: Network,
    x: list[list[float]] | None,
    dt: list[float] | None,
    n: int,
    now: bool = False,
) -> list[list[float]]:
    """An update's input rows: ``x``, or for a state-space model (whose rows carry y and an
    optional ``dt`` instead) [[dt_i]], dt_i 1 where not given (``service.filters.statespace``).
    Raises InvalidInput for the wrong one, or dt of the wrong length or not > 0 (``now``, for a
    prediction: >= 0, 0 the time of the latest update)."""
    if not isinstance(network, StateSpace):
        if dt is not None:
            raise InvalidInput("dt is for state_space models; this model's rows carry x")
        if x is None:
            raise InvalidInput(
                "x is required: the input rows (this model is not a state_space one)"
            )
        return x
    if x is not None:
        raise InvalidInput("a state_space model's rows carry y and optional dt, not x")
    if dt is None:
        return [[1.0]] * n
    if len(dt) != n:
        raise InvalidInput(f"dt has {len(dt)} entries but y has {n}")
    if now and not all(d >= 0 for d in dt):  # a prediction: 0 is the latest update's time
        raise InvalidInput("dt must be >= 0 (the time after the latest update)")
    if not now and not all(d > 0 for d in dt):
        raise InvalidInput("dt must be > 0 (the time since the previous observation)")
    return [[float(d)] for d in dt]
