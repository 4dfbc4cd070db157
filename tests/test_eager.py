"""``service.hosting.eager.started``: a coroutine run at once up to its first suspension, then
on in a task, against the same coroutine run as a plain task."""

from __future__ import annotations

import asyncio

import pytest

from service.hosting.eager import started


def test_a_coroutine_that_never_suspends_is_done_without_a_turn_of_the_loop() -> None:
    async def main() -> None:
        turns: list[int] = []
        asyncio.get_running_loop().call_soon(turns.append, 1)

        async def finishes() -> int:
            return 7

        async def fails() -> int:
            raise ValueError("refused")

        ok, bad = started(finishes()), started(fails())
        assert ok.done() and ok.result() == 7
        assert bad.done() and isinstance(bad.exception(), ValueError)
        assert turns == []  # neither waited for the loop
        await asyncio.sleep(0)
        assert turns == [1]

    asyncio.run(main())


def test_a_coroutine_that_suspends_goes_on_in_a_task_as_it_would_have() -> None:
    async def main() -> None:
        log: list[str] = []
        gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def waits() -> str:
            log.append("first step")
            got = await gate
            log.append(f"resumed with {got}")
            await asyncio.sleep(0)  # a bare yield
            try:
                await asyncio.sleep(0.001)
            except ValueError:
                raise
            return got.upper()

        fut = started(waits())
        assert log == ["first step"] and not fut.done()  # ran up to its first await, now
        gate.set_result("go")
        assert await fut == "GO"
        assert log == ["first step", "resumed with go"]

        # an exception raised after the suspension is the future's
        later: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def fails_later() -> None:
            await later
            raise KeyError("late")

        fut2 = started(fails_later())
        later.set_result(None)
        with pytest.raises(KeyError, match="late"):
            await fut2

    asyncio.run(main())


def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    async def main() -> None:
        seen: list[str] = []
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def waits() -> None:
            try:
                await never
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        fut = started(waits())
        await asyncio.sleep(0)
        fut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fut
        assert seen == ["cancelled"] and fut.cancelled()

        async def cancels_itself() -> None:
            raise asyncio.CancelledError

        assert started(cancels_itself()).cancelled()

    asyncio.run(main())
