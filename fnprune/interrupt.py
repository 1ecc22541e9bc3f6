"""Ctrl-C (or SIGTERM) that waits for a safe point, so a long step can save its work before stopping."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["deferred_interrupt", "InterruptedAfterWrite", "ProgressSaver"]

log = logging.getLogger("fnprune")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what `kill`, systemd or a container stop sends


class InterruptedAfterWrite(KeyboardInterrupt):
    """Stopped after the output was written (its message says what is left to do)."""


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


class ProgressSaver:
    """Saves a long step's progress to `path` every `every` seconds (at least ten times the last save's duration)
    and after a step interrupted by Ctrl-C or SIGTERM, then stops the run; `path` None: nothing is saved and Ctrl-C
    stops at once. A failed save (full disk, unwritable cache) costs only the resume: the work goes on without
    saving, and an interrupt still stops it after the current step."""

    def __init__(self, what: str, path: Path | None, every: float):
        self.what, self.path, self.every = what, path, every
        self.writable = path is not None
        self.last_save, self.interval = time.monotonic(), every
        self._pressed: Callable[[], bool] = lambda: False

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """Inside, with a file to save to, a first Ctrl-C waits for the end of the step (`after_step`)."""
        if self.path is None:
            yield
            return
        with deferred_interrupt(f"finishing this step to save {self.what} progress") as pressed:
            self._pressed = pressed
            try:
                yield
            finally:
                self._pressed = lambda: False

    def after_step(self, save: Callable[[], None], done: str, last: bool) -> None:
        """Call `save` (it writes `path`) if it is time or Ctrl-C was pressed, then stop on Ctrl-C; `done`: how far
        the work is, for the message; `last`: the final step (no periodic save: the work is about to finish)."""
        interrupted = self._pressed()
        if self.writable and (interrupted or (not last and time.monotonic() - self.last_save >= self.interval)):
            start = time.monotonic()
            try:
                save()
                self.interval = max(self.every, 10 * (time.monotonic() - start))
            except OSError as exc:
                self.writable = False
                log.warning("cannot save %s progress to %s (%s); %s goes on without saving it", self.what,
                            self.path, exc, self.what)
            self.last_save = time.monotonic()
        if interrupted:
            raise KeyboardInterrupt(
                f"{self.what} progress saved ({done}); the same command continues from there" if self.writable
                else f"{self.what} stopped ({done}); its progress could not be saved")

    def finished(self) -> None:
        """The work completed: its progress file has served."""
        if self.path is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:  # its folder is not one (saving failed the same way): nothing was left there
                pass
