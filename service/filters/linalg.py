"""The one linear-algebra module: symmetrise, Cholesky with jitter, whitening, checks.

Nothing else in ``service.filters`` re-implements these. All functions are pure and keep the dtype
and device of their inputs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from service.errors import InvalidInput, StepRejected

__all__ = [
    "Check",
    "all_finite",
    "check_finite",
    "check_positive",
    "cholesky",
    "finite_check",
    "identity",
    "input_check",
    "not_finite",
    "positive_check",
    "psd_sqrt",
    "settle",
    "shared_constant",
    "symmetrise",
    "tracing",
]


def symmetrise(A: Tensor) -> Tensor:
    """(A + A^T) / 2 over the last two dimensions (1 x 1 blocks are returned as they are)."""
    if A.shape[-1] == 1:
        return A
    return 0.5 * (A + A.mT)


_TRACE = threading.local()


@contextlib.contextmanager
def tracing() -> Iterator[None]:
    """Marks this thread as tracing a step to compile it (``service.filters.compiled``): code
    that branches on data takes its branch-free form meanwhile. Per thread, unlike torch's own
    ``is_exporting`` flag, so that eager steps on other threads keep their exact behaviour."""
    _TRACE.on = True
    try:
        yield
    finally:
        _TRACE.on = False


def _traced() -> bool:
    return bool(getattr(_TRACE, "on", False))


def may_stop_early(t: Tensor) -> bool:
    """Whether an iteration over ``t`` may test for convergence and stop: on a CPU (reading a
    CPU tensor is no device sync) and outside a compile's trace (no branch on data there)."""
    return t.device.type == "cpu" and not _traced()


def shared_constant(make: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``make`` (hashable arguments -> a constant tensor) made once per arguments and shared, so
    its tensors are never to be written to; made afresh while traced, so that no tensor of the
    tracer's outlives the trace in the cache."""
    cached = functools.lru_cache(maxsize=256)(make)

    @functools.wraps(make)
    def get(*args: object) -> Tensor:
        return make(*args) if _traced() else cached(*args)

    return get


@shared_constant
def identity(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """I_n, made once per size, dtype and device: shared, so never to be written to."""
    return torch.eye(n, dtype=dtype, device=device)


def cholesky(A: Tensor, *, what: str = "matrix", max_tries: int = 6) -> Tensor:
    """Lower Cholesky factor of a symmetric positive-definite ``A`` (..., n, n).

    Tries the plain factorisation first; if it fails, adds ``jitter * I`` with jitter growing from
    ``eps * mean|diag(A)|`` by factors of 10, ``max_tries`` times (so up to ``1e5 eps mean|diag|``
    by default; one jitter for a whole batch). Raises :class:`StepRejected` ("not_psd") naming
    ``what`` if none makes it succeed (``docs/algorithms.md`` 6.2).
    """
    L: Tensor
    L, info = torch.linalg.cholesky_ex(A)
    if _traced():  # no branch on data: a failure poisons L, which the step's checks then catch
        return torch.where(info.unsqueeze(-1).unsqueeze(-1) == 0, L, torch.nan)
    if not bool(info.any()):
        return L
    scale = A.diagonal(dim1=-2, dim2=-1).abs().mean().clamp_min(torch.finfo(A.dtype).tiny)
    jitter = torch.finfo(A.dtype).eps * scale
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(A + jitter * eye)
        if not bool(info.any()):
            return L
        jitter = jitter * 10.0
    raise StepRejected("not_psd", f"{what} is not positive definite")


def psd_sqrt(A: Tensor) -> Tensor:
    """The symmetric root F = V Lambda^{1/2} V^T (F F^T = F^2 = A) of a symmetric positive
    semi-definite ``A`` (n, n), by ``eigh``; for a stack (..., n, n), one root per matrix.

    Unlike a Cholesky factor it exists for singular A (e.g. two identical rows of J in
    J Sigma J^T); eigenvalues below ``n eps max|lambda|`` of their own matrix (rounding noise)
    count as zero, so identical rows get identical rows of F. Unlike V Lambda^{1/2} alone it is
    unique, so it moves with A continuously: two matrices equal to rounding have roots equal to
    rounding (an eigenvector's sign, or its basis within a repeated eigenvalue, is arbitrary),
    and a draw g + z F^T with one seed moves no more than the belief it comes from.
    """
    lam, V = torch.linalg.eigh(symmetrise(A))
    floor = A.shape[-1] * torch.finfo(A.dtype).eps * lam.abs().amax(-1, keepdim=True)
    F = V * torch.where(lam > floor, lam, torch.zeros_like(lam)).sqrt().unsqueeze(-2)
    root: Tensor = F @ V.mT
    return root


def _total(tensors: Sequence[Tensor]) -> Tensor:
    total = tensors[0].sum()
    for t in tensors[1:]:
        total = total + t.sum()
    return total


def all_finite(*tensors: Tensor) -> bool:
    """True when no tensor holds NaN or +-inf: one reduction per tensor and one host sync.

    A NaN or an infinity anywhere makes the sum non-finite; a sum can also overflow when entries
    approach the dtype's largest value (about 3e38 in float32), which counts as non-finite too: a
    belief that large is not one to keep.
    """
    return math.isfinite(float(_total(tensors)))


@functools.lru_cache(maxsize=64)
def not_finite(what: str, dtype: torch.dtype) -> str:
    """The message for input that is not finite in ``dtype``: NaN, infinite, or a number that
    overflowed it when converted (the HTTP edge admits finite numbers only, so there it is that)."""
    name = str(dtype).removeprefix("torch.")
    return (
        f"{what} holds NaN or infinite values, or values beyond the {name} range (magnitudes up "
        f'to {torch.finfo(dtype).max:.3g}); scale them or create the model with "dtype": "float64"'
    )


def check_finite(name: str, *tensors: Tensor) -> None:
    """Raise :class:`StepRejected` ("non_finite") if any tensor holds NaN or +-inf."""
    if not all_finite(*tensors):
        raise StepRejected("non_finite", f"the step made {name} non-finite")


def check_positive(name: str, t: Tensor) -> None:
    """Raise :class:`StepRejected` ("not_psd") unless every entry of ``t`` is > 0 and finite."""
    check_finite(name, t)
    if not float(t.min()) > 0:
        raise StepRejected("not_psd", f"the step made {name} non-positive")


@dataclass(frozen=True)
class Check:
    """A validity check whose verdict is still on the device: ``value`` is a 0-d tensor that is
    finite exactly when the check passes.

    Steps collect their checks and :func:`settle` reads them all at once, one ``isfinite`` over
    them all and one host sync per request instead of a reduction and a sync per check; a failed
    check raises :class:`StepRejected` with its ``reason`` ("non_finite" or "not_psd") and
    ``message``, or :class:`InvalidInput` with ``message`` when ``reason`` is "invalid_input"
    (a check of the request's own numbers).
    """

    reason: str
    message: str
    value: Tensor


def finite_check(name: str, *tensors: Tensor) -> Check:
    """Deferred :func:`check_finite`: no NaN or +-inf in any tensor (by the sum, as ``all_finite``)."""
    return Check("non_finite", f"the step made {name} non-finite", _total(tensors))


def positive_check(name: str, t: Tensor) -> Check:
    """Deferred :func:`check_positive`: every entry of ``t`` finite and > 0.

    sum(t) + log(min(t)) is finite exactly then: log of a minimum <= 0 is -inf or NaN, and the
    sum is not finite if an entry is not.
    """
    return Check("not_psd", f"the step made {name} non-positive", t.sum() + t.min().log())


def input_check(what: str, t: Tensor) -> Check:
    """Deferred finiteness of request numbers ``t`` already converted to the model's dtype: a
    failure is the caller's (:class:`InvalidInput`, with :func:`not_finite`'s message)."""
    return Check("invalid_input", not_finite(what, t.dtype), t.sum())


def settle(checks: Sequence[Check]) -> None:
    """Raise the first failed check's error (in order); one host sync when all pass."""
    if not checks:
        return
    values = torch.stack([c.value for c in checks])
    if math.isfinite(float(values.sum() * 0)):  # x * 0 is 0 for finite x, NaN otherwise
        return
    failed = (~torch.isfinite(values)).nonzero()
    if failed.numel() == 0:  # the finite values' sum overflowed
        return
    first = checks[int(failed[0, 0])]
    if first.reason == "invalid_input":
        raise InvalidInput(first.message)
    raise StepRejected(first.reason, first.message)
