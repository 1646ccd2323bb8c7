"""Process memory tuning for the data path (glibc only; a no-op elsewhere).

uvloop reads up to 256 KiB at a time into a fresh bytes object.  Above
glibc's default mmap threshold (128 KiB, adjusted dynamically) each such
buffer is a fresh mmap(), page-faulted in 4 KiB at a time and unmapped
when freed: a quarter of the CPU of a 1 MiB body went to page faults
(bench/RESULTS.md).  A fixed threshold above the largest read keeps those
buffers in the heap, where pages are reused; the trim threshold caps what
a burst of large bodies may leave resident.
"""

from __future__ import annotations

import ctypes

__all__ = ["tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 32 * 1024 * 1024


def tune_malloc() -> bool:
    """Apply the thresholds; True if glibc took them."""
    try:
        # The process's own symbols include libc's: no library search (and
        # no ldconfig subprocess) needed.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl has no mallopt)
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    mmap_ok: int = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trim_ok: int = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return mmap_ok == 1 and trim_ok == 1
