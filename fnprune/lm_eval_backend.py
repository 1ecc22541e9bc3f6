"""lm-evaluation-harness as a second scorer (optional: pip install 'fnprune[lm-eval]').

Users judge a pruned model with lm-eval, so fnprune runs it: `fnprune evaluate --lm-eval-tasks` on any checkpoint,
and compress (`evaluation.lm_eval_tasks`) on the dense and the pruned model, report.json's `lm_eval` section. The
model is loaded by fnprune (`load_model`: uniform, padded and per-layer layouts, the last without remote code)
and handed to lm-eval's HFLM as an object, so lm-eval never needs to know how per-layer widths are stored. Tasks
come from lm-eval's registry or from `include` (a folder of task YAMLs, e.g. evaluation/lm_eval_tasks over local
files). The dense model's results are cached like its fnprune scores.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import json
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from . import cache
from .data import MIN_SHARED, comparable
from .errors import DataError, FnpruneError, first_line
from .provenance import file_sha256, key_versions
from .recipe import EvaluationSpec, ModelSpec, Recipe
from .yaml_io import read_yaml

__all__ = ["check_lm_eval", "check_lm_eval_disjoint", "lm_eval_available", "lm_eval_cache_key", "lm_eval_files",
           "lm_eval_metrics", "lm_eval_report", "run_lm_eval", "score_lm_eval", "task_metrics"]

log = logging.getLogger("fnprune")
INSTALL = "pip install 'fnprune[lm-eval]'"
SHOWN_FIRST = ("acc", "acc_norm")  # the metrics summaries show first; then any other, stderrs left out


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def check_lm_eval(tasks: list[str], include: str | None) -> dict[str, Any]:
    """Before any work: lm-eval installed, `include` a folder, every task known to lm-eval; else one line.
    Returns lm-eval's task dict (empty without tasks)."""
    if not tasks:
        return {}
    if include is not None and not Path(include).expanduser().is_dir():
        raise FnpruneError(f"evaluation.lm_eval_include (--lm-eval-include): {include} is not a folder (of lm-eval "
                           "task YAMLs)")
    if not lm_eval_available():
        raise FnpruneError(f"evaluation.lm_eval_tasks (--lm-eval-tasks {','.join(tasks)}) needs "
                           f"lm-evaluation-harness, which is not installed: {INSTALL}")
    from lm_eval.tasks import get_task_dict

    try:  # a task YAML's error (a missing function, bad field) now, not after calibration
        return get_task_dict(tasks, _task_manager(include, tasks))
    except FnpruneError:
        raise
    except Exception as exc:  # whatever lm-eval raises for a task it cannot build
        raise FnpruneError(f"lm-eval cannot build task(s) {', '.join(tasks)}: {type(exc).__name__}: "
                           f"{first_line(exc)}") from exc


def _leaf_tasks(node: dict) -> Iterator[tuple[str, Any]]:
    """(name, task) of every task in lm-eval's task dict, groups opened."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaf_tasks(value)
        else:
            yield str(key), value


def _document_strings(node: Any) -> Iterator[str]:
    """Every string field of an lm-eval document (nested ones too), stripped."""
    if isinstance(node, str):
        yield node.strip()
    elif isinstance(node, dict):
        for value in node.values():
            yield from _document_strings(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _document_strings(value)


def check_lm_eval_disjoint(task_dict: dict[str, Any], calibration_texts: list[tuple[str, ...]],
                           limit: int | None) -> None:
    """Refuse lm-eval tasks whose scored documents hold a calibration example's longest text as one of their
    fields, as the task's evaluation split and the --validate benchmarks are refused: e.g. fnp_arc_easy (ARC-Easy's
    Dev file) while compressing arc_easy, which calibrates on that file."""
    keys = {max(texts, key=len) for texts in calibration_texts if texts}
    keys = {t for t in keys if len(t) >= MIN_SHARED}
    for name, task in _leaf_tasks(task_dict):
        docs = list(task.eval_docs)[:limit] if limit else list(task.eval_docs)  # the documents lm-eval scores
        fields = {comparable(v) for d in docs for v in _document_strings(d)}  # as example_key compares texts
        shared = sorted(keys & fields)
        if shared:
            raise DataError(
                f"evaluation.lm_eval_tasks: {name}'s documents hold {len(shared)} calibration example(s), e.g. "
                f"{shared[0][:60]!r}; lm-eval would score the pruned model on its calibration data (drop the task, "
                "or point its YAML at a file the calibration does not read)"
            )


def _task_manager(include: str | None, tasks: list[str]):
    """lm-eval's TaskManager with every task in `tasks` (an unknown one: FnpruneError). Indexing lm-eval's own
    tasks (about 14,700 names) takes 10 s or more, so tasks that are all plain tasks of `include` get a manager
    of that folder alone; managers are kept for the process (per folder contents), so compress builds one."""
    folder = str(Path(include).expanduser().resolve()) if include else None
    return _manager(folder, _folder_digest(folder) if folder else "", tuple(tasks))


@functools.lru_cache(maxsize=8)
def _manager(folder: str | None, digest: str, tasks: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    if folder:
        local = TaskManager(include_path=folder, include_defaults=False)
        if all(t in local.all_subtasks for t in tasks):
            return local
    manager = TaskManager(include_path=folder) if folder else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (looked in lm-eval's own tasks and in {folder})" if folder else \
            " (add --lm-eval-include DIR for local task YAMLs)"
        raise FnpruneError(f"lm-eval has no task(s) {', '.join(unknown)}{where}{_unreadable_yaml(folder)}")
    return manager


def _unreadable_yaml(folder: str | None) -> str:
    """'; FILE is not valid YAML (...)' for the first task YAML of `folder` lm-eval skipped without a word."""
    import yaml

    for path in sorted(Path(folder).rglob("*.yaml")) if folder else []:
        try:  # parsed, never constructed: lm-eval's own tags (!function) are not errors here
            list(yaml.compose_all(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark else ""
            return f"; {path}{where} is not valid YAML ({getattr(exc, 'problem', None) or first_line(exc)})"
    return ""


def _folder_files(root: Path) -> list[Path]:
    """The task folder's own files: its YAMLs and their utils.py."""
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def lm_eval_files(include: str) -> list[Path]:
    """Every local file the include folder's tasks read: the folder's own and the data files its YAMLs name."""
    root = Path(include).expanduser().resolve()
    own = _folder_files(root)
    return own + [p for p in _data_files(str(root)) if p not in own]


def _folder_digest(folder: str) -> str:
    """sha256 of every file under the task folder (its YAMLs and their utils.py), by relative path."""
    digest, root = hashlib.sha256(), Path(folder)
    for path in _folder_files(root):
        digest.update(json.dumps([path.relative_to(root).as_posix(), file_sha256(path)]).encode())
    return digest.hexdigest()


class _AnyTagLoader(yaml.SafeLoader):
    """lm-eval YAMLs carry tags such as `!function utils.arc_docs`: read as null, the rest as safe_load does."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _data_files(folder: str) -> list[Path]:
    """Local files the folder's YAMLs name (e.g. dataset_kwargs.data_files), relative to the current directory
    as `datasets` reads them, or to the YAML's folder."""
    found: set[Path] = set()

    def walk(node: Any, here: Path) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value, here)
        elif isinstance(node, list):
            for value in node:
                walk(value, here)
        elif isinstance(node, str) and "\n" not in node and 0 < len(node) < 4096:
            for candidate in (Path(node).expanduser(), here / node):
                if candidate.is_file():
                    found.add(candidate.resolve())
                    break

    for path in sorted(Path(folder).rglob("*.y*ml")):
        try:
            walk(read_yaml(path.read_text(encoding="utf-8"), _AnyTagLoader), path.parent)
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            continue  # lm-eval reports a broken YAML itself
    return sorted(found)


def lm_eval_cache_key(spec: ModelSpec, ev: EvaluationSpec) -> str:
    """Everything lm-eval's scores of a model depend on: model files, tasks, the task folder's files and the
    data files its YAMLs name, limit, batching, lm-eval's and the other libraries' versions."""
    import lm_eval

    folder = str(Path(ev.lm_eval_include).expanduser().resolve()) if ev.lm_eval_include else None
    return cache.cache_key({
        "lm_eval": getattr(lm_eval, "__version__", None),
        "tasks": list(ev.lm_eval_tasks),
        "include": _folder_digest(folder) if folder else None,
        "data": [[str(p), file_sha256(p)] for p in _data_files(folder)] if folder else [],
        "limit": ev.lm_eval_limit,
        "batch_size": ev.batch_size,
        "model": cache.model_fingerprint(spec.name_or_path, spec.revision),
        "dtype": spec.dtype,
        "versions": key_versions(),
        "metric_names": "filters kept",  # entries before it merged a task's filters into one name
    })


def run_lm_eval(model: nn.Module, tokenizer, tasks: list[str], include: str | None = None, batch_size: int = 16,
                limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """lm-eval's results per task ({"acc": ..., "acc_norm": ..., "acc_stderr": ..., "n": ...}) and its version.
    The model's training mode, the tokenizer (HFLM may give it a pad token) and the global random states (lm-eval
    seeds them) are left as they were. `progress` off: lm-eval's info lines and progress bars too."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise FnpruneError(f"the lm-eval backend needs lm-evaluation-harness: {INSTALL}") from exc
    manager = _task_manager(include, tasks)
    was_training, states = model.training, _random_states()
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        with _quiet_lm_eval(not progress):
            raw = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                          log_samples=False)
    finally:
        model.train(was_training)
        _restore_random_states(states)
    results = task_metrics(raw or {})
    return {"lm_eval_version": getattr(lm_eval, "__version__", None), "tasks": tasks,
            "include": str(Path(include).expanduser().resolve()) if include else None,  # cached: not relative
            "limit": limit, "results": results}


def task_metrics(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task, lm-eval's numeric metrics by name and the documents scored (`n`). lm-eval names a metric
    "METRIC,FILTER": under the filter "none" (every log-likelihood task's) the name is the metric's alone; a task
    scored under several filters (gsm8k's strict-match and flexible-extract) keeps each as lm-eval names it."""
    results: dict[str, dict[str, Any]] = {}
    for task, metrics in raw.get("results", {}).items():
        results[task] = {
            k.removesuffix(",none"): v for k, v in metrics.items()
            if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        results[task]["n"] = _documents(raw, task)
    return results


def _documents(raw: dict[str, Any], task: str) -> int | None:
    """Documents lm-eval scored for a task; for a group (no count of its own), the sum over its subtasks."""
    entry = raw.get("n-samples", {}).get(task)
    if entry:
        return entry.get("effective")
    parts = [_documents(raw, sub) for sub in raw.get("group_subtasks", {}).get(task, [])]
    return sum(parts) if parts and None not in parts else None


# lm-eval modules that draw progress bars with `tqdm` (it has no switch for all of them)
_LM_EVAL_BARS = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextmanager
def _quiet_lm_eval(quiet: bool) -> Iterator[None]:
    """Inside, with `quiet`: lm-eval logs warnings only and its progress bars are off; restored after."""
    if not quiet:
        yield
        return
    logger = logging.getLogger("lm_eval")
    level = logger.level
    modules = [m for m in map(importlib.import_module, _LM_EVAL_BARS) if hasattr(m, "tqdm")]
    bars = [m.tqdm for m in modules]
    logger.setLevel(logging.WARNING)
    for m, bar in zip(modules, bars):
        m.tqdm = functools.partial(_no_bar, bar)
    try:
        yield
    finally:
        logger.setLevel(level)
        for m, bar in zip(modules, bars):
            m.tqdm = bar


def _no_bar(bar, *args: Any, **kwargs: Any):
    """`bar(...)` switched off, whatever `disable` its caller passed."""
    return bar(*args, **{**kwargs, "disable": True})


def _random_states() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _restore_random_states(states: tuple) -> None:
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    if states[3] is not None:
        torch.cuda.set_rng_state_all(states[3])


def score_lm_eval(model, tokenizer, recipe: Recipe, cached_as: ModelSpec | None = None, progress: bool = True
                  ) -> dict[str, Any] | None:
    """run_lm_eval on the recipe's `evaluation.lm_eval_tasks` (None: none, or evaluation off); with `cached_as`
    (the dense model's spec) read from / saved to the cache, so the next compress of the same base model does not
    run it again."""
    ev = recipe.evaluation
    if not (ev.enabled and ev.lm_eval_tasks):
        return None
    key = lm_eval_cache_key(cached_as, ev) if cached_as is not None and recipe.calibration.cache and \
        cache.usable() else ""
    found = cache.load_lm_eval(key) if key else None
    if found is not None:
        log.info("dense lm-eval results from cache %s", cache.cache_dir())
        return found
    log.info("lm-eval: %s", ", ".join(ev.lm_eval_tasks))
    found = run_lm_eval(model, tokenizer, ev.lm_eval_tasks, ev.lm_eval_include, ev.batch_size, ev.lm_eval_limit,
                        progress)
    if key:
        cache.save_lm_eval(key, found)
    return found


def lm_eval_report(dense: dict[str, Any] | None, pruned: dict[str, Any] | None) -> dict[str, Any]:
    """report.json's `lm_eval`: per task its documents and every metric, dense beside pruned ({}: no lm-eval)."""
    if not (dense or pruned):
        return {}
    first = dense or pruned or {}
    include = first.get("include")
    tasks: dict[str, Any] = {}
    for name in {**(dense or {}).get("results", {}), **(pruned or {}).get("results", {})}:
        d, p = ((r or {}).get("results", {}).get(name) for r in (dense, pruned))
        tasks[name] = {"n": (d or p or {}).get("n"),
                       "dense": {k: v for k, v in (d or {}).items() if k != "n"} if d else None,
                       "pruned": {k: v for k, v in (p or {}).items() if k != "n"} if p else None}
    return {"version": first.get("lm_eval_version"),
            "include": str(Path(include).expanduser().resolve()) if include else None,
            "limit": first.get("limit"), "tasks": tasks}


def lm_eval_metrics(entry: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(metric, dense, pruned) of one report.json `lm_eval.tasks` entry: acc, acc_norm, then the others, without
    their stderrs (what the CLI summary and the model card show)."""
    dense, pruned = entry.get("dense") or {}, entry.get("pruned") or {}
    names = [m for m in {**dense, **pruned} if "stderr" not in m]
    ordered = [m for m in SHOWN_FIRST if m in names] + sorted(m for m in names if m not in SHOWN_FIRST)
    return [(m, dense.get(m), pruned.get(m)) for m in ordered]
