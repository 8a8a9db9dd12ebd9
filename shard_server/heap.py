"""Hand memory that Python freed back to the operating system (glibc's ``malloc_trim``).

A bulk write's parts (megabytes each) come from the malloc heap, not from mmap: glibc raises its mmap threshold
to the size of the largest block freed so far. Freed in the order they arrived, oldest first, they leave holes
below the heap's top, which glibc neither reuses for the vectors (allocated as one block) nor returns on its own:
draining a 415 MiB stream while applying it then lowered the shard's peak by nothing. ``malloc_trim`` releases
the free pages anywhere in the heap. Elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return free heap pages to the OS (a few milliseconds; call it after freeing large amounts, not per query)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
