"""Keep freed memory for the next window instead of handing it back to the system.

The backbone allocates the same large activations for every window (tens of MB each) and
frees them at the end of the window. glibc serves blocks over its mmap threshold with fresh
``mmap`` calls and returns them with ``munmap``, so every window faults in and zeroes those
pages again: on the demo wafer's inspection (45 windows of 1664 px, 2 cores) the kernel's share
was 25 of 122 CPU seconds and the network took 38 s; with the heap kept, 4 s and 24-25 s
(inspection 65 -> 48-53 s, peak RSS 1.13 -> 1.29 GB: the freed blocks stay in each thread's
heap; one heap for every thread, ``M_ARENA_MAX = 1``, kept more, 1.5-1.6 GB).
:func:`reused_heap` switches glibc to its heap for the duration (``M_MMAP_MAX = 0``, no trim)
and, on leaving, restores its limits and returns the free pages (``malloc_trim``). Elsewhere
than glibc (macOS, musl) it does nothing.

Written by hand because no library exposes ``mallopt`` and ``malloc_trim``; two C calls
through ctypes.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

#: glibc's defaults for a 64-bit process as its dynamic threshold leaves them for large
#: blocks: mmap above 32 MiB, trim the heap's top above twice that
_RESTORED = ((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 64 << 20))
_KEPT = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))

_lock = threading.Lock()
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``malloc_trim``), else None."""
    try:
        # the symbols the interpreter is linked with: no library search (find_library runs
        # ldconfig in a subprocess, at every import)
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError, TypeError):  # no such symbols; Windows: no None
        return None


_LIBC = _glibc()


@contextmanager
def reused_heap() -> Iterator[None]:
    """Serve large blocks from the heap and keep them there while inside (re-entrant, any
    thread); on leaving the outermost one, glibc's limits are restored and the free pages
    returned."""
    global _depth
    with _lock:
        _depth += 1
        if _depth == 1 and _LIBC is not None:
            for param, value in _KEPT:
                _LIBC.mallopt(param, value)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _LIBC is not None:
                for param, value in _RESTORED:
                    _LIBC.mallopt(param, value)
                _LIBC.malloc_trim(0)
