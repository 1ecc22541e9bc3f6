"""Give freed memory back to the operating system between pipeline stages.

glibc's malloc keeps freed blocks of mid-sized tensors (a batch's activations, a layer's d x d matrices) in
its heap, and after a stage that interleaved many of them the process keeps hundreds of MiB it no longer uses
(measured on SmolLM2 compress: peak RSS varied by 0.3 GiB between identical runs). `release_memory` collects
garbage and asks glibc to trim; elsewhere it only collects garbage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache

__all__ = ["release_memory"]


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def release_memory(collect: bool = True) -> None:
    """Return freed heap memory to the OS (glibc); `collect` first runs the garbage collector."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
