"""Keep the C heap's memory for reuse between batches (glibc), instead of a page fault per byte.

glibc's malloc serves each block larger than 32 MB (most activations of a batch) with a fresh
``mmap`` and gives it back with ``munmap`` when the tensor is freed. Every forward pass then
touches brand-new pages: tens of thousands of page faults, each zero-filled by the kernel, which
on a 2-core machine doubled the time of a forward pass of the bundled model. With ``mmap`` off for
malloc and a high trim threshold, freed blocks stay in the heap and the next batch reuses them:
the process holds its peak (one batch's working set) instead of returning and faulting it back.

This changes the whole process's allocator, so the ``camcli`` command calls it (it owns its
process) and a Python program may call it itself; importing camcli does not. The price: resident
memory does not shrink below the run's peak (one batch's working set and the writers' images)
until the process ends, and forked decoding workers inherit the setting.
"""

from __future__ import annotations

import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # freed memory at the top of the heap beyond 1 GiB still goes back to the system


def keep_heap_memory() -> bool:
    """Tune glibc's malloc as above; True if it was done, False where the C library is not glibc
    (macOS, Windows, musl), which is left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)  # the C library the interpreter already runs on
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it: musl's mallopt does nothing
    except (ImportError, OSError, AttributeError):  # no _ctypes, or not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
