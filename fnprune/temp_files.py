"""Temporary files and folders written beside their target, then renamed into place.

Each is named `.<target>.<pid>.<random>.<kind>` (kind: partial, old, tmp) and locked (flock) while its writer
works on it, so the next write to the same target can sweep what a killed run left: an entry is stale when its
pid is not a live process here and no process holds its lock (a run in another container or on another machine
sharing the folder has another pid namespace, but holds the lock).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the pid alone decides
    fcntl = None  # type: ignore[assignment]

__all__ = ["KINDS", "make_temp", "locked", "replaced", "sweep_stale", "remove"]

KINDS = ("partial", "old", "tmp")


def make_temp(target: Path, kind: str, folder: bool = False) -> Path:
    """A new temporary file (or folder) beside `target`, named for the sweep."""
    parent = target.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{target.name}.{os.getpid()}.", f".{kind}"
    if folder:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
    os.close(fd)
    return Path(name)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a file or a folder) for the block: the sweep leaves it alone."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a file system without flock: unlocked, the pid alone protects it
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def replaced(target: Path) -> Iterator[Path]:
    """Yield a locked temporary file beside `target` (what a killed write left swept first), renamed onto `target`
    when the block ends without an error, deleted in any case: `target` is never half-written."""
    sweep_stale(target, ("tmp",))
    tmp = make_temp(target, "tmp")
    try:
        with locked(tmp):
            yield tmp
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _held(path: Path) -> bool:
    """Whether another process holds `path`'s lock."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def remove(path: Path) -> None:
    """Delete a folder or a file, or only the link when it is a symbolic link (the folder it points to is not
    ours)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def sweep_stale(target: Path, kinds: tuple[str, ...] = KINDS) -> None:
    """Delete the temporary entries of `target` a killed run left (see the module doc); only names of exactly this
    form count, so another target's (`ckpt.25` beside `ckpt`) are never touched."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[a-z0-9_]+\.({'|'.join(kinds)})")
    parent = target.absolute().parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _pid_alive(int(match.group(1))) and not _held(entry):
            remove(entry)
