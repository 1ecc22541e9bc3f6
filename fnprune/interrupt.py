"""Ctrl-C (or SIGTERM) that waits for a safe point, so a long step can save its work before stopping."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["deferred_interrupt"]

log = logging.getLogger("fnprune")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what `kill`, systemd or a container stop sends


@contextmanager
def deferred_interrupt(what: str) -> Iterator[Callable[[], bool]]:
    """Inside the block the first Ctrl-C or SIGTERM only sets a flag (the yielded function returns True from then
    on), so the caller can finish its step, save, and raise KeyboardInterrupt itself; a second one stops at once.
    The previous handlers are restored on exit.

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
        log.warning("interrupted (%s): %s (again to stop at once)", signal.Signals(signum).name, what)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield lambda: bool(pressed)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL if sig != signal.SIGINT
                          else signal.default_int_handler)
