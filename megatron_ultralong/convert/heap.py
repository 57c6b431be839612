"""Hand freed heap memory back to the OS, so a converter's resident memory follows what it holds
rather than everything it has touched.

Why: glibc serves allocations below its mmap threshold from the heap, and that threshold rises (up
to 32 MiB on 64-bit) each time a larger mmapped block is freed. After that, a model stage's
parameters and the tensors read or built for them live in the heap, and memory freed in its middle
stays resident: a converter that touches and frees a model's weights one layer at a time would end
up holding all of them (measured: +178 MiB peak for a 188 MiB model whose tensors were all below
16 MiB). `malloc_trim(0)` returns every free page of every arena (glibc >= 2.8 madvises free chunks
inside the heap too), which bounds the peak by the live tensors. Tensors above the threshold are
mmapped and unmapped on free, so at 8B scale this matters less, but the cost is small (one pass
over the allocator's free lists per layer or parameter).
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable, Optional


def _load_malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Return the allocator's free pages to the OS (glibc `malloc_trim(0)`; a no-op elsewhere)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
