"""Process-level tuning applied at start (not filter math).

glibc's malloc returns every freed block above 128 KiB to the kernel, so each filter step pays
first-touch page faults on its fresh D x (d + C) temporaries; raising the mmap and trim thresholds
lets those blocks be reused. Measured with ``python -m benchmarks.filter_speed``: a LoFi step at
D = 1e5, d = 10 with process noise went from about 18x to 6x the time of one Gram product.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["tune_allocator"]

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
