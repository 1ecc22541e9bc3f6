"""Thread control for the torch engine: kernels on one CPU thread, layers shared out to a pool of workers.

Small LAPACK calls (eigh, Cholesky, QR) run on one CPU thread: on a shared machine torch's threaded LAPACK is
many times slower than single-threaded (threads spin while waiting). The batched engine instead shares whole
layers out to one single-threaded worker per core, so a layer's result does not depend on the core count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["ByteBudget", "locked", "map_in_threads", "one_thread", "worker_count"]

_T = TypeVar("_T")
_R = TypeVar("_R")


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's (process-wide) intra-op thread count set to n inside the block; None leaves it alone."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread(device: str | torch.device, small: bool = True):
    """Run the block on one CPU thread (on other devices, or when not `small`, nothing changes)."""
    return _torch_threads(1 if torch.device(device).type == "cpu" and small else None)


def worker_count(device: str | torch.device, workers: int | None) -> int:
    """Threads to share layers out to: `workers`, default torch's thread count; one on a non-CPU device, whose
    kernels are already parallel."""
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if torch.device(device).type != "cpu":
        return 1
    return workers if workers is not None else max(1, torch.get_num_threads())


class ByteBudget:
    """Threads hold at most `limit` bytes of estimated working memory at once; a request larger than the limit
    waits until it can run alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self._changed:
            while self.used and self.used + nbytes > self.limit:
                self._changed.wait()
            self.used += nbytes
        try:
            yield
        finally:
            with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


def locked(fn: Callable[[int], object]) -> Callable[[int], None]:
    """`fn` behind a lock, for a progress bar that several workers advance."""
    lock = threading.Lock()

    def call(n: int = 1) -> None:
        with lock:
            fn(n)

    return call


def map_in_threads(fn: Callable[[int, _T], _R], items: Iterable[_T], workers: int) -> list[_R]:
    """[fn(i, item) for i, item in enumerate(items)] on `workers` threads, in order.

    Items are pulled one at a time (a generator is never run ahead, nor from two threads at once). After a
    failure no new item starts, and the failure of the lowest item index is raised, as a loop would.
    """
    source = enumerate(items)
    if workers == 1:
        return [fn(i, item) for i, item in source]
    lock, results, errors = threading.Lock(), {}, {}

    def work() -> None:
        while True:
            with lock:
                if errors:
                    return
                try:
                    i, item = next(source)
                except StopIteration:
                    return
            try:
                results[i] = fn(i, item)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                with lock:
                    errors[i] = exc
                return

    threads = [threading.Thread(target=work, name=f"fnprune-ica-{n}", daemon=True) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[min(errors)]
    return [results[i] for i in range(len(results))]
