"""The memory store's events beyond what the store conformance suite asks of every store: its
expiry heap (``expired_events`` costs what has expired) and untracked event tuples."""

from __future__ import annotations

import asyncio
import gc

from service.store import MemoryStore


def test_expired_events_come_oldest_first_through_the_heap_and_settled_ones_are_dropped() -> None:
    async def body() -> None:
        s = MemoryStore()
        await s.create_model("m", b"{}")
        # inserted out of expiry order, 300 past and one in the future
        for k in range(300):
            assert await s.put_event("m", f"e{k:03d}", b"r%d" % k, 1000.0 + (k * 7) % 300)
        assert await s.put_event("m", "future", b"f", 1e12)
        for k in range(0, 300, 3):  # a third rewarded
            await s.settle_event("m", f"e{k:03d}")
        pending = sorted(
            ((1000.0 + (k * 7) % 300, f"e{k:03d}") for k in range(300) if k % 3), key=lambda t: t
        )
        first = await s.expired_events("m", 2000.0, limit=50)
        assert [e for e, _ in first] == [e for _, e in pending[:50]]
        assert await s.expired_events("m", 2000.0, limit=50) == first  # due until settled
        for e, _ in first:
            await s.settle_event("m", e)
        rest = await s.expired_events("m", 2000.0, limit=1000)
        assert [e for e, _ in rest] == [e for _, e in pending[50:]]
        for e, _ in rest:
            await s.settle_event("m", e)
        assert await s.expired_events("m", 2000.0) == []
        assert list(s._events) == [("m", "future")]  # every expired event is gone
        # an id kept again after it went: its old expiry in the heap is not its new one
        assert await s.put_event("m", "e001", b"again", 5000.0)
        assert await s.expired_events("m", 2000.0) == []
        assert await s.expired_events("m", 6000.0) == [("e001", b"again")]

    asyncio.run(body())


def test_kept_events_are_not_tracked_by_the_cyclic_collector() -> None:
    async def body() -> MemoryStore:
        s = MemoryStore()
        await s.create_model("m", b"{}")
        for k in range(1000):
            await s.put_event("m", f"e{k}", b"x", 1e12)
        await s.settle_event("m", "e1")
        return s

    s = asyncio.run(body())
    gc.collect()
    assert not any(gc.is_tracked(v) for v in s._events.values())
