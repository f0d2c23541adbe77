"""The C heap: hand its free memory back to the OS (glibc ``malloc_trim``). Both the
context cache (after dropping snapshots) and the voice (after onnxruntime shrinks its
arena) free large blocks that fall below malloc's mmap threshold and would otherwise
stay in the process for good."""

from __future__ import annotations

import ctypes
import functools
from typing import Any


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library, another OS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def trim_heap() -> bool:
    """Hand the C heap's free memory back to the OS (every arena, holes included);
    False where there is no such call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
