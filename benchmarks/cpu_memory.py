"""Resident memory that follows the live tensors, for the CPU memory benchmarks.

glibc keeps freed blocks for reuse, so after a first step the resident set size (RSS) no longer
rises when tensors are allocated again, and a memory figure read from RSS would mean nothing.
`release_freed_memory_to_system` makes glibc give every block above a threshold its own mapping,
returned to the system when freed; from then on RSS rises and falls with the tensors. Allocation
gets slower, so time nothing after calling it.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def release_freed_memory_to_system(threshold_bytes: int = 64 * 1024) -> ctypes.CDLL:
    """Make glibc map every block above `threshold_bytes` on its own and unmap it when freed.

    Returns libc, whose `malloc_trim(0)` returns what the heap still holds.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as error:
        raise SystemExit(
            "This benchmark measures resident memory and needs glibc (libc.so.6) to return "
            f"freed memory to the system; it could not be loaded: {error}"
        ) from error
    if not (libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
            and libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes)):
        raise SystemExit("glibc refused mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD).")
    return libc
