"""Give freed memory back to the operating system between pipeline stages.

glibc's malloc keeps freed blocks of mid-sized tensors (a batch's activations, a layer's d x d matrices) in
its heap, and after a stage that interleaved many of them the process keeps memory it no longer uses, so peak
memory varies between identical runs. `release_memory` collects garbage and asks glibc to trim; elsewhere it
only collects garbage.

A full garbage collection walks every tracked Python object, and there are hundreds of thousands once torch and
transformers are imported and a model is loaded. Inside `objects_frozen()` the objects that already exist are
left out of collections (`gc.freeze`), so the pipeline's collections cost nearly nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

__all__ = ["objects_frozen", "release_memory"]

_frozen_depth = 0


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


@contextmanager
def objects_frozen() -> Iterator[None]:
    """Within the block, garbage collections skip the objects alive when it started (see the module doc).

    Unreachable cycles among those objects wait until the outermost block ends; plain references still free
    them at once, as tensors and modules are. Nested blocks are fine: only the outermost one unfreezes.
    """
    global _frozen_depth
    gc.freeze()
    _frozen_depth += 1
    try:
        yield
    finally:
        _frozen_depth -= 1
        if _frozen_depth == 0:
            gc.unfreeze()
