"""Process-level tuning applied at start (not filter math).

glibc's malloc returns every freed block above 128 KiB to the kernel, so each filter step pays
first-touch page faults on its fresh D x (d + C) temporaries; raising the mmap and trim thresholds
lets those blocks be reused. Measured with ``python -m benchmarks.filter_speed``: a LoFi step at
D = 1e5, d = 10 with process noise went from about 18x to 6x the time of one Gram product.

The cyclic collector's youngest generation is collected every 700 net allocations by default: a
400-row reward batch allocates tens of thousands of short-lived objects (row reports, scores,
answers), so dozens of collections run inside one request, each walking what is young then.
``tune_gc`` raises that threshold (and gen 1's) so a request's garbage is mostly freed by
reference counting before a collection looks at it; reference cycles are still collected, later.
Measured in process on the Shuttle bandit's arms-as-outputs linear model (400-item batches): decide
21-25 -> 20-21 ms, reward 20-21 -> 15-18 ms; many models' batched updates 13.5k -> 16.4k/s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

__all__ = ["GC_THRESHOLDS", "tune_allocator", "tune_gc"]

#: the cyclic collector's thresholds for generations 0, 1 and 2 (Python's default: 700, 10, 10)
GC_THRESHOLDS = (20_000, 20, 10)

log = logging.getLogger("postserve.runtime")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap/trim thresholds; False (and nothing changed) where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    except (OSError, AttributeError):
        return False
    if not ok:
        log.debug("mallopt refused the thresholds")
    return bool(ok)


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """Collect the young generations less often (see the module's docstring)."""
    gc.set_threshold(*thresholds)
