"""Ctrl-C that waits for a safe point, so a long step can save its work before stopping."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["deferred_interrupt"]

log = logging.getLogger("fnprune")


@contextmanager
def deferred_interrupt(what: str) -> Iterator[Callable[[], bool]]:
    """Inside the block the first Ctrl-C only sets a flag (the yielded function returns True from then on), so
    the caller can finish its step, save, and raise KeyboardInterrupt itself; a second Ctrl-C stops at once.

    Signals reach only the main thread: elsewhere Ctrl-C keeps its usual behaviour and the flag stays False.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pressed: list[bool] = []

    def handler(signum: int, frame: object) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)
        log.warning("interrupted: %s (Ctrl-C again to stop at once)", what)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
