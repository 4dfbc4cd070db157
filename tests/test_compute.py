"""Where filter work runs (``service.hosting.compute``): inline on the event loop or on a worker
thread, by its size and by whether the process has more than one core."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.hosting.compute import (
    COMPILED_INLINE_WORK,
    INLINE_WORK,
    SINGLE_CORE_INLINE_WORK,
    Compute,
)


def _where(compute: Compute, work: int, compiled: bool = False) -> str:
    async def go() -> str:
        loop = threading.get_ident()
        ran = await compute.run(work, threading.get_ident, compiled=compiled)
        return "inline" if ran == loop else "thread"

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("work", "compiled", "expected"),
    [
        (INLINE_WORK, False, "inline"),
        (INLINE_WORK + 1, False, "thread"),
        (COMPILED_INLINE_WORK, True, "inline"),
        (COMPILED_INLINE_WORK + 1, True, "thread"),
    ],
)
def test_several_cores_take_large_work_to_a_thread(
    work: int, compiled: bool, expected: str
) -> None:
    assert _where(Compute(2, single_core=False), work, compiled) == expected


@pytest.mark.parametrize("compiled", [False, True])
def test_one_core_runs_work_inline_up_to_its_own_bound(compiled: bool) -> None:
    compute = Compute(1, single_core=True)
    assert _where(compute, COMPILED_INLINE_WORK + 1, compiled) == "inline"
    assert _where(compute, SINGLE_CORE_INLINE_WORK, compiled) == "inline"
    assert _where(compute, SINGLE_CORE_INLINE_WORK + 1, compiled) == "thread"
