"""Compiled steps: one row's ``predict`` + ``update`` of one filter at one state shape, compiled
ahead of time by AOTInductor (``docs/algorithms.md`` 6.5).

A small model's eager step is mostly PyTorch's per-op dispatch (about a hundred ops of 1-2 us on
17 numbers). :func:`compile_step` traces the filter's own step, ``OnlineFilter._update`` after
``predict`` (``torch.export``: the same Python math, no second copy), compiles the graph to one
C++ kernel and loads it; a call then costs one dispatch::

    kernel(state fields..., x (1, I), y (C,))
        -> (new state fields..., predictive mean, epistemic, aleatoric (1, C),
            log density (), eta (1, C), var_eta (1, C, C), verdict ())

Code that branches on data takes a branch-free form while traced (``linalg.cholesky``: a failed
factorisation poisons its factor with NaN instead of retrying with jitter), so the kernel is
trusted only when all its checks pass: the verdict is whether all the checks' values are finite
(not ``sum * 0``, which the compiler may fold to 0). :class:`RowKernel` reads it with one host sync
per row and answers ``None`` when it is false; the caller then computes that row with the eager
step, which retries, or raises the exact error. The same rows through the same kernel give the same
bits, so a replay through it reproduces the state it replays; the kernel's rounding differs from
the eager step's (its reductions are fused), which is why each log record names the kernel that
computed it (``service.hosting``).

Compiling takes seconds to a minute (a C++ compiler runs); the package is kept under ``directory``
by a key of everything it depends on (the filter, the state's shapes, dtype and device, the source
of this package's modules, the torch version and CPU capability), so a restart or a second model of
the same shape loads it in milliseconds.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic

import torch
from torch import Tensor

from service.filters import draws
from service.filters.algorithm import Belief, S, state_tensors
from service.filters.base import Predictive, StepInfo, packed
from service.filters.linalg import tracing
from service.filters.online import OnlineFilter
from service.filters.statespace import StateSpace

__all__ = [
    "OUTPUT_KERNELS",
    "DrawKernel",
    "OutputKernels",
    "PredictKernel",
    "RowKernel",
    "compile_draws",
    "compile_output_steps",
    "compile_predictive",
    "compile_step",
    "draw_kernel_key",
    "kernel_key",
    "output_kernels_key",
    "predictive_kernel_key",
]

log = logging.getLogger("postserve.filters")


@dataclass(frozen=True)
class RowKernel(Generic[S]):
    """A compiled step of one filter at one state shape (see the module's docstring)."""

    key: str
    state_type: type[S]
    fields: tuple[str, ...]
    run: Callable[..., Sequence[Tensor]]

    def __call__(self, state: S, x: Tensor, y: Tensor) -> tuple[S, StepInfo] | None:
        """The step of row x (1, I) with encoded target y (C,) from ``state`` (before the
        dynamics), or ``None`` when one of its checks fails: the caller computes that row with
        the eager step instead."""
        out = self.run(*(getattr(state, k) for k in self.fields), x, y)
        n = len(self.fields)
        if not out[-1].item():  # the checks' verdict: one host sync
            return None
        new = self.state_type(*out[:n])
        mean, epistemic, aleatoric, loglik, eta, var_eta, packed = out[n : n + 7]
        p = Predictive(mean, epistemic, aleatoric)
        return new, StepInfo(p, loglik, eta, var_eta, packed)


@dataclass(frozen=True)
class OutputKernels(Generic[S]):
    """The compiled steps of rows that observe one output alone (``OnlineFilter.run``'s
    ``outputs``): ``steps[k]`` is the :class:`RowKernel` of ``f.restrict(k)``, for each of the
    network's C outputs; ``key`` names the set (:func:`output_kernels_key`) in a log record."""

    key: str
    steps: tuple[RowKernel[S], ...]


#: What every :func:`output_kernels_key` begins with (a :func:`kernel_key` never does).
OUTPUT_KERNELS = "outputs-"


def output_kernels_key(f: OnlineFilter[S], state: S) -> str:
    """The key of :func:`compile_output_steps`' set: a digest of its C kernels' keys."""
    keys = [kernel_key(f.restrict(k), state) for k in range(f.network.output_dim)]
    return OUTPUT_KERNELS + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]


def compile_output_steps(f: OnlineFilter[S], state: S, directory: Path) -> OutputKernels[S]:
    """The compiled step of each output observed alone, as :func:`compile_step` (each kept
    under ``directory`` by its own key)."""
    steps = tuple(
        compile_step(f.restrict(k), state, directory) for k in range(f.network.output_dim)
    )
    return OutputKernels(output_kernels_key(f, state), steps)


@dataclass(frozen=True)
class DrawKernel(Generic[S]):
    """A compiled Thompson decision among the C outputs of one row, by output-space draws
    (``service.filters.draws``; ``docs/algorithms.md`` 6.5)::

        kernel(belief fields..., x (1, I), z (M, C))
            -> (verdict, action, scores (C), shares (C)) packed in one float64 tensor

    for a belief already predicted one step ahead and M standard normals z per output: the
    draws mu(g + z Omega^{1/2}) of ``draws.drawn``, draw 0's arg-max as the action and its
    values as the scores, and the arg-max shares of all M (``draws.argmax_shares``) as the
    propensities, as ``policy.decide`` makes them eagerly from the same z. The verdict is
    whether x, Omega and the draws are all finite; where it is false (Omega is then replaced
    by I, which ``eigh`` takes), ``__call__`` answers None and the caller decides eagerly,
    which raises the exact error. A decision changes no state and is logged as its answer, so
    nothing replays it: only its rounding differs from the eager one's."""

    key: str
    fields: tuple[str, ...]
    samples: int
    run: Callable[..., Sequence[Tensor]]

    def __call__(
        self, belief: S, x: Tensor, z: Tensor
    ) -> tuple[int, list[float], list[float]] | None:
        """(action, scores, propensities) of row x (1, I) with normals z (M, C), or None."""
        (out,) = self.run(*(getattr(belief, k) for k in self.fields), x, z)
        v = out.tolist()  # the one host sync
        if not v[0]:
            return None
        C = (len(v) - 2) // 2
        return int(v[1]), v[2 : 2 + C], v[2 + C :]


def draw_kernel_key(f: OnlineFilter[S], state: S, samples: int) -> str:
    """The key of :func:`compile_draws`' kernel: the step's key (what the filter and state
    shapes are) and the number of draws."""
    return "draws-" + hashlib.sha256(f"{kernel_key(f, state)}\n{samples}".encode()).hexdigest()[:24]


def compile_draws(f: OnlineFilter[S], state: S, directory: Path, samples: int) -> DrawKernel[S]:
    """The :class:`DrawKernel` of ``f`` at ``state``'s shapes and ``samples`` draws, kept under
    ``directory`` as :func:`compile_step`'s. For a network linear in its parameters or drawn
    ``linearized``, with at least as many parameters as outputs (the eager output-space draw's
    conditions)."""
    fields = _fields(state)
    key = draw_kernel_key(f, state, samples)
    mean: Tensor = state.mean
    x = mean.new_zeros((1, f.network.input_dim))
    z = mean.new_zeros((samples, f.network.output_dim))
    args = (*(getattr(state, k) for k in fields), x, z)
    what = f"the Thompson draws of {type(f.algorithm).__name__}"
    run = _package(_Draws(f, type(state), fields), args, directory / f"{key}.pt2", what)
    return DrawKernel(key=key, fields=fields, samples=samples, run=run)


@dataclass(frozen=True)
class PredictKernel(Generic[S]):
    """The compiled linearised predictive of one row, one step ahead (``/predict`` of one row;
    ``docs/algorithms.md`` 6.5)::

        kernel(state fields..., x (1, I)) -> (mean, variance, epistemic, aleatoric) (4 C,) float64

    ``OnlineFilter.linearized(predict(state), x)`` traced, packed in the order
    ``answers.Moments`` keeps them. It changes no state and nothing replays it; its answers
    differ from the eager ones by rounding only. It checks nothing: the caller takes its answer
    only if all of it is finite, and otherwise asks the eager predictive, which raises the
    exact error."""

    key: str
    fields: tuple[str, ...]
    run: Callable[..., Sequence[Tensor]]

    def __call__(self, state: S, x: Tensor) -> Tensor:
        """The packed moments (4 C,) of row x (1, I) under ``state`` (before the dynamics)."""
        (out,) = self.run(*(getattr(state, k) for k in self.fields), x)
        return out


def predictive_kernel_key(f: OnlineFilter[S], state: S) -> str:
    """The key of :func:`compile_predictive`'s kernel (the step's key: the same dependencies)."""
    return "predictive-" + hashlib.sha256(kernel_key(f, state).encode()).hexdigest()[:24]


def compile_predictive(f: OnlineFilter[S], state: S, directory: Path) -> PredictKernel[S]:
    """The :class:`PredictKernel` of ``f`` at ``state``'s shapes, kept under ``directory`` as
    :func:`compile_step`'s. Not for a state-space model (its transition depends on each row)."""
    if isinstance(f.network, StateSpace):
        raise NotImplementedError("a state_space model predicts eagerly (it is small)")
    fields = _fields(state)
    key = predictive_kernel_key(f, state)
    mean: Tensor = state.mean
    args = (*(getattr(state, k) for k in fields), mean.new_zeros((1, f.network.input_dim)))
    what = f"the predictive of {type(f.algorithm).__name__}"
    run = _package(_Predictive(f, type(state), fields), args, directory / f"{key}.pt2", what)
    return PredictKernel(key=key, fields=fields, run=run)


class _Traced(torch.nn.Module, Generic[S]):
    """A function of filter ``f`` over flat tensors, the state's ``fields`` first, for export."""

    def __init__(self, f: OnlineFilter[S], state_type: type[S], fields: tuple[str, ...]) -> None:
        super().__init__()
        self.f, self.state_type, self.fields = f, state_type, fields


class _Draws(_Traced[S]):
    """The traced function of :class:`DrawKernel`."""

    def forward(self, *args: Tensor) -> Tensor:
        n = len(self.fields)
        belief, x, z = self.state_type(*args[:n]), args[n], args[n + 1]
        mean, cov = draws.output_space(self.f, belief, x)
        ok = torch.isfinite(torch.stack([x.sum(), cov.sum()])).all()
        cov = torch.where(ok, cov, torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device))
        drawn = self.f.likelihood.mean(draws.drawn(mean, cov, z))  # (M, C)
        winners, shares = draws.argmax_shares(drawn.reshape(1, z.shape[0], -1))
        ok = ok & torch.isfinite(drawn.sum())
        f64 = torch.float64
        return torch.cat(
            [ok.to(f64).reshape(1), winners[0, :1].to(f64), drawn[0].to(f64), shares[0]]
        )


class _Predictive(_Traced[S]):
    """The traced function of :class:`PredictKernel`."""

    def forward(self, *args: Tensor) -> Tensor:
        n = len(self.fields)
        p = self.f.linearized(self.f.predict(self.state_type(*args[:n])), args[n])
        parts = [p.mean, p.variance, p.epistemic, p.aleatoric]
        return torch.cat([t.reshape(-1) for t in parts]).to(torch.float64)


class _Step(_Traced[S]):
    """The traced function: ``OnlineFilter._update(predict(state), x, y)``."""

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        n = len(self.fields)
        state = self.state_type(*args[:n])
        new, info, checks = self.f._update(self.f.predict(state), args[n], args[n + 1])
        p = info.predictive
        assert info.eta is not None and info.var_eta is not None
        return (
            *(getattr(new, k) for k in self.fields),
            p.mean,
            p.epistemic,
            p.aleatoric,
            info.log_likelihood,
            info.eta,
            info.var_eta,
            packed(info),
            # the step's checks, and x's finiteness (``OnlineFilter._run_rows`` leaves it here)
            torch.isfinite(torch.stack([args[n].sum(), *(c.value for c in checks)])).all(),
        )


def _fields(state: Belief) -> tuple[str, ...]:
    return tuple(state_tensors(state))


@functools.cache
def _source_digest() -> str:
    """A digest of the filter code a kernel is traced from (every module of this package), so
    that a kernel kept by an earlier version of it is never loaded for the current one."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def kernel_key(f: OnlineFilter[S], state: S) -> str:
    """What a compiled step depends on, hashed: the filter's parts (the prior only sets the
    initial state), the state's shapes, dtype and device, the filter code, the torch version
    and the CPU."""
    shapes = [(k, tuple(getattr(state, k).shape)) for k in _fields(state)]
    mean: Tensor = state.mean
    parts = (
        repr((f.network, f.likelihood, f.algorithm, f.dynamics, f.process_noise)),
        repr(shapes),
        str(mean.dtype),
        str(mean.device),
        _source_digest(),
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
        platform.machine(),
    )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def compile_step(f: OnlineFilter[S], state: S, directory: Path) -> RowKernel[S]:
    """The compiled step of ``f`` at ``state``'s shapes, from ``directory`` when it holds one
    of the same key, else compiled now (seconds) and kept there. Raises whatever torch.export
    or the compiler raises for a step it cannot compile; the caller keeps the eager step."""
    if isinstance(f.network, StateSpace):  # its transition is built on the host, per row
        raise NotImplementedError("a state_space model steps eagerly (it is small)")
    state_type, fields = type(state), _fields(state)
    key = kernel_key(f, state)
    mean: Tensor = state.mean
    x = mean.new_zeros((1, f.network.input_dim))
    y = mean.new_zeros((f.network.output_dim,))
    args = (*(getattr(state, k) for k in fields), x, y)
    what = f"the step of {type(f.algorithm).__name__}"
    run = _package(_Step(f, state_type, fields), args, directory / f"{key}.pt2", what)
    return RowKernel(key=key, state_type=state_type, fields=fields, run=run)


def _package(
    module: torch.nn.Module, args: tuple[Tensor, ...], path: Path, what: str
) -> Callable[..., Sequence[Tensor]]:
    """``module`` at ``args``' shapes as a compiled kernel: loaded from ``path`` when it exists,
    else exported (in ``tracing`` mode), compiled, and kept there first."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # torch's own deprecations, inside the compiler
            warnings.simplefilter("ignore")
            with tracing():
                program = torch.export.export(module, args, strict=False)
            fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
            os.close(fd)
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=tmp)
                os.replace(tmp, path)  # whole or not at all, for a concurrent reader
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        log.info("compiled %s into %s", what, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        package = torch._inductor.aoti_load_package(str(path))
    return _flat_call(package)


def _flat_call(package: Callable[..., Sequence[Tensor]]) -> Callable[..., Sequence[Tensor]]:
    """The package's runner on flat tensors in, flat tensors out. The package's own ``__call__``
    parses its input and output tree specs from JSON on every call (about 10 us, as long as the
    Kalman kernel itself); the inputs and outputs here are flat already, so the runner's
    ``boxed_run`` takes them as they are (the same outputs, ``tests/test_compiled.py``)."""
    loader = getattr(package, "loader", None)
    if loader is None or not hasattr(loader, "boxed_run"):  # another torch: its own call
        return package
    boxed_run: Callable[[list[Tensor]], Sequence[Tensor]] = loader.boxed_run
    return lambda *args: boxed_run(list(args))
