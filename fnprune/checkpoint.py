"""Write and read pruned checkpoints: HF layout + recipe.yaml + report.json + networks + model card.

Output is written into a temporary sibling directory and renamed into place at the end, so an interrupted
run never leaves a half-written checkpoint, and an existing directory is replaced only with `overwrite`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .arch import layout_for
from .errors import FnpruneError, OutputError
from .interrupt import InterruptedAfterWrite, deferred_interrupt
from .temp_files import locked, make_temp, remove, sweep_stale

__all__ = [
    "RECIPE_FILE",
    "REPORT_FILE",
    "NETWORKS_FILE",
    "NETWORKS_META_FILE",
    "CARD_FILE",
    "check_output_dir",
    "check_disk_space",
    "atomic_output_dir",
    "atomic_output_file",
    "save_networks",
    "write_json",
]

RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "report.json"
NETWORKS_FILE = "networks.safetensors"
NETWORKS_META_FILE = "networks.json"
CARD_FILE = "README.md"


def check_disk_space(path: Path, needed_bytes: int) -> None:
    """Refuse early when the output's filesystem cannot hold the checkpoint (estimated from its size)."""
    free = shutil.disk_usage(_existing_ancestor(path)).free
    if free < needed_bytes:
        raise OutputError(
            f"not enough disk space for {path}: about {needed_bytes / 2**20:.0f} MiB needed, "
            f"{free / 2**20:.0f} MiB free"
        )


def _existing_ancestor(path: Path) -> Path:
    parent = path.absolute().parent
    while not os.path.lexists(parent):
        parent = parent.parent
    return parent


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_dir(path: Path, overwrite: bool, inputs: Iterable[str | Path | None] = (),
                     work: dict[str, str | None] | None = None, own_files: Iterable[str] = ()) -> None:
    """Fail before any heavy work if the output cannot be written, or if writing it (which replaces the whole
    folder with --overwrite) would destroy the current directory or a local input (`inputs`: model and data
    paths; Hub ids and None are skipped), or overlap a folder the run writes to (`work`: setting -> folder,
    existing or not, e.g. the offload folder). --overwrite replaces only an empty folder or one holding one of
    `own_files` (what this command writes, e.g. report.json): never a cache, a model folder or a user's files."""
    target = path.expanduser().resolve()
    for setting, folder in (work or {}).items():
        other = Path(folder).expanduser().resolve() if folder else None
        if other is not None and (_inside(target, other) or _inside(other, target)):
            raise OutputError(f"output {path} and {setting} {folder} overlap: the run writes both; use separate "
                              "folders")
    cwd = Path.cwd().resolve()
    if _inside(cwd, target):
        raise OutputError(
            f"output {path} is the current directory or contains it; give a new folder, e.g. {path / 'pruned'}"
        )
    for item in inputs:
        if not item or not Path(item).expanduser().exists():
            continue
        source = Path(item).expanduser().resolve()
        if _inside(target, source) or _inside(source, target):
            where = "is" if target == source else "is inside" if _inside(target, source) else "contains"
            raise OutputError(
                f"output {path} {where} the input {item}; choose another output folder"
            )
    if os.path.lexists(path) and not overwrite:
        raise OutputError(f"output {path} already exists; pass --overwrite to replace it")
    if os.path.lexists(path) and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a directory")
    own = list(own_files)
    if (own and path.is_dir() and not path.is_symlink() and any(path.iterdir())
            and not any((path / name).is_file() for name in own)):
        raise OutputError(f"output {path} is a folder this command did not write (no {' or '.join(own)}); "
                          "--overwrite replaces only such outputs: give a new folder")
    parent = _existing_ancestor(path)
    if not parent.is_dir():
        raise OutputError(f"cannot create output {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent}")


def umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ordinary_modes(directory: Path) -> None:
    """Give every file the mode a plain write gives (0666 minus the umask): safetensors writes its files 0600
    (through a private temp file), so another user or a non-root container could not read the weights."""
    mode = 0o666 & ~umask()
    for f in directory.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(mode)


def _rename_if_absent(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` only if nothing is at `dst` (False otherwise). A directory rename never replaces a
    non-empty directory or a file (POSIX), so an output that appears between the check and the rename is kept;
    only an empty directory could be replaced."""
    if os.path.lexists(dst):
        return False
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return False
        raise
    return True


@contextmanager
def atomic_output_file(path: Path, overwrite: bool = False):
    """Yield a temporary file name beside `path`, put in place on success and deleted on any failure; one that a
    killed run left is swept by the next write to the same name (`temp_files`). Callers check `path` first;
    without `overwrite` a file that appeared meanwhile is never replaced (this run's is kept beside it)."""
    sweep_stale(path)
    tmp = make_temp(path, "partial")
    try:
        with locked(tmp):
            yield tmp
            tmp.chmod(0o666 & ~umask())  # mkstemp makes it private; the output is an ordinary file
            if overwrite:
                os.replace(tmp, path)
            elif not _link_if_absent(tmp, path):
                kept = path.absolute().parent / f"{path.name}.fnprune-{os.getpid()}"
                os.replace(tmp, kept)
                raise OutputError(f"output {path} appeared while this run was writing it (another run?) and was "
                                  f"left as it is; this run's file is {kept}: move it into place, or rerun with "
                                  "--overwrite")
    finally:
        tmp.unlink(missing_ok=True)


def _link_if_absent(src: Path, dst: Path) -> bool:
    """Put file `src` at `dst` only if nothing is there (a hard link fails if `dst` exists); False otherwise."""
    try:
        os.link(src, dst)
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: check, then rename (a small window)
        if os.path.lexists(dst):
            return False
        os.replace(src, dst)
    return True


@contextmanager
def atomic_output_dir(path: Path, overwrite: bool):
    """Yield a temporary directory; on success it replaces `path`, on any failure it is deleted.

    Callers check `path` first (`check_output_dir`, before their heavy work). Without `overwrite`, an output that
    appeared since is never replaced: this run's finished checkpoint is then kept beside it
    (`<name>.fnprune-<pid>`, named in the OutputError), so no work is lost. Replacing an output, a first Ctrl-C
    waits until the old one is deleted (the new one is already in place).
    """
    sweep_stale(path)
    tmp = make_temp(path, "partial", folder=True)
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private; the output is an ordinary folder
    try:
        with locked(tmp):
            yield tmp
            _ordinary_modes(tmp)
            if overwrite and os.path.lexists(path):  # a symbolic link is replaced, the folder it pointed to kept
                if _exchange(tmp, path):  # one step: the path always holds a whole output
                    _remove_replaced(tmp)
                    return
                old = tmp.with_suffix(".old")  # two steps where the file system cannot exchange
                path.rename(old)
                tmp.rename(path)
                _remove_replaced(old)
                return
            placed = _rename_if_absent(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not placed:
        kept = path.absolute().parent / f"{path.name}.fnprune-{os.getpid()}"
        if not _rename_if_absent(tmp, kept):
            kept = tmp
        raise OutputError(
            f"output {path} appeared while this run was writing it (another run?) and was left as it is; this "
            f"run's output is in {kept}: move it into place, or rerun with --overwrite"
        )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system or the file system
    cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove_replaced(old: Path) -> None:
    """Delete the output just replaced; a first Ctrl-C waits for it (the new output is in place), a second stops
    with the new output in place and `old` left for the next run's sweep."""
    with deferred_interrupt(f"deleting the replaced output {old} (the new one is in place)"):
        try:
            remove(old)
        except KeyboardInterrupt:
            raise InterruptedAfterWrite(f"the new output is in place; the output it replaced may be left in {old} "
                                        "(delete it)") from None


def read_report(directory: Path) -> dict[str, Any]:
    """An output folder's report.json, read as untrusted input: it must be a non-empty JSON object (its fields
    may still be missing or of the wrong type; readers check each one)."""
    path = directory / REPORT_FILE
    if not path.is_file():
        raise FnpruneError(f"{directory} has no {REPORT_FILE}: not an fnprune output folder")
    report = read_json_object(path, "fnprune's report object")
    if not report:
        raise FnpruneError(f"{path}: an empty object, not an fnprune report")
    return report


def read_json_object(path: Path, what: str = "an object", error: type[FnpruneError] = FnpruneError) -> dict[str, Any]:
    """A JSON object from a file a user handed over (report.json, a checkpoint's config.json), or a one-line
    `error` saying why it is not `what`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: a JSON {type(data).__name__}, not {what}")
    return data


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_networks(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Functional networks and kept indices: tensors in safetensors, the rest as JSON."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / NETWORKS_FILE))
    write_json(directory / NETWORKS_META_FILE, meta)


SHIM_FILE = "modeling_fnprune.py"
_SHIM_BASE_LINE = "from transformers import PreTrainedModel as _Base  # fnprune:base-class (rewritten when saved)"


def shim_source(base_class: str) -> str:
    """The per-layer loader (fnprune/remote_code/modeling_fnprune.py) with its base class filled in."""
    text = (Path(__file__).parent / "remote_code" / SHIM_FILE).read_text(encoding="utf-8")
    if _SHIM_BASE_LINE not in text or not base_class.isidentifier():
        raise ValueError(f"cannot write the per-layer loader for {base_class!r}")
    return text.replace(_SHIM_BASE_LINE, f"from transformers import {base_class} as _Base  # fnprune:base-class")


def write_per_layer_code(directory: Path, model) -> None:
    """Save the loader beside the weights and point `auto_map` at it (loads with trust_remote_code=True)."""
    base = type(model).__name__
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SHIM_FILE).write_text(shim_source(base), encoding="utf-8")
    model.config.auto_map = {layout_for(model).head: "modeling_fnprune.FnpruneModel"}
