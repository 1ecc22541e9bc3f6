"""objects_frozen: collections skip older objects inside the block, and everything is collectable after it."""

from __future__ import annotations

import gc
import weakref

from fnprune.memory import objects_frozen, release_memory


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the garbage collector frees it


def test_objects_frozen_skips_old_objects_and_restores():
    old = _Node()
    old_ref = weakref.ref(old)
    before = gc.get_freeze_count()
    with objects_frozen():
        assert gc.get_freeze_count() > before
        del old
        with objects_frozen():  # nested (compress calls calibrate): the inner exit keeps the freeze
            pass
        assert gc.get_freeze_count() > before
        new = _Node()
        new_ref = weakref.ref(new)
        del new
        release_memory()
        assert new_ref() is None  # created inside the block: collected as usual
        assert old_ref() is not None  # frozen: waits for the block to end
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old_ref() is None


def test_objects_frozen_unfreezes_on_error():
    try:
        with objects_frozen():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0
