"""On-disk cache of calibration activations and functional networks, so reruns and sweeps skip them.

Entries are safetensors + JSON, keyed by a hash of everything that determines them (model files, prompts,
settings, library versions), and written to a temporary file that is renamed into place: an interrupted run
never leaves a half-written entry. An interrupted capture leaves its progress under the same key
(`capture_progress_path`), which the next run continues from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .capture import LayerActivations
from .data import Example
from .distillation import TeacherTargets
from .evaluate import TaskResult, choice_lengths, scored
from .moments import SecondMoments
from .networks import LayerNetworks
from .perplexity import PerplexityResult
from .recipe import TaskSpec
from .safetensors_io import read_with_meta, write_atomic
from .temp_files import replaced

__all__ = [
    "activation_tensors", "activations_from_tensors", "cache_dir", "cache_key", "capture_progress_path",
    "save_activations",
    "load_activations", "save_networks", "load_networks", "save_evaluation", "load_evaluation", "save_perplexity",
    "load_perplexity", "save_lm_eval", "load_lm_eval", "save_teacher", "load_teacher", "save_analysis_scores",
    "load_analysis_scores", "usable",
]

log = logging.getLogger("fnprune")
T = TypeVar("T")


def cache_dir() -> Path:
    """$FNPRUNE_CACHE_DIR, else ~/.cache/fnprune."""
    return Path(os.environ.get("FNPRUNE_CACHE_DIR", "~/.cache/fnprune")).expanduser()


def usable() -> bool:
    """Whether the cache folder can be created and written; if not, say so once (per folder and process) and go
    on without it (the cache only saves time)."""
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        ok = os.access(path, os.W_OK | os.X_OK)
    except OSError:
        ok = False
    if not ok and path not in _WARNED:
        _WARNED.add(path)
        log.warning("cache folder %s cannot be written (set FNPRUNE_CACHE_DIR or use --no-cache): running without "
                    "the cache", path)
    return ok


_WARNED: set[Path] = set()  # unwritable cache folders already named in a warning


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def model_fingerprint(name_or_path: str, revision: str | None) -> dict[str, Any]:
    """Local files by name, size, mtime and ctime in nanoseconds (cheap, no read; ctime changes on every write and
    no copy tool sets it, so weights replaced in place with `cp -p` are new); Hub models by id, revision and the
    commit it resolves to (a branch moves: the same id and revision can be new weights)."""
    path = Path(name_or_path).expanduser()
    if not path.exists():  # the commit, once known, is the weights: a saved recipe's pinned revision is the same
        commit = hub_commit(name_or_path, revision)
        return {"hub": name_or_path, "commit": commit} if commit else {"hub": name_or_path, "revision": revision}
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stats = [(p.name, p.stat()) for p in files]
    return {"files": [(name, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for name, s in stats]}


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit `revision` (default main) of a Hub model resolves to in the local Hub cache: after
    `from_pretrained`, the one it loaded (it updates the cache's refs). None when nothing is cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # not a repo id (e.g. a .gguf path inside one): the revision alone keys it
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def activation_tensors(acts: list[LayerActivations]) -> dict[str, torch.Tensor]:
    """Flat name -> tensor view of per-layer activations (token sample or its moments), for safetensors."""
    tensors = {}
    for i, a in enumerate(acts):
        for name in ("decision", "mean", "mean_abs", "var"):
            tensors[f"{i}.{name}"] = getattr(a, name)
        if a.tokens is not None:
            tensors[f"{i}.tokens"] = a.tokens
        if a.moments is not None:
            tensors.update({f"{i}.moments.{k}": v for k, v in a.moments.state().items()})
    return tensors


def activations_from_tensors(t: dict[str, torch.Tensor], counts: list[int]) -> list[LayerActivations]:
    """Inverse of `activation_tensors`."""
    acts = []
    for i, c in enumerate(counts):
        prefix = f"{i}.moments."
        state = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
        acts.append(LayerActivations(
            t.get(f"{i}.tokens"), t[f"{i}.decision"], t[f"{i}.mean"], t[f"{i}.mean_abs"], t[f"{i}.var"], c,
            SecondMoments.from_state(state) if state else None,
        ))
    return acts


def capture_progress_path(key: str) -> Path:
    """Where an interrupted capture for this cache key saves its progress (fnprune.capture)."""
    return cache_dir() / f"capture-{key}.partial.safetensors"


def _write(name: str, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bool:
    """Write one entry (True when written); a full disk or an unwritable folder only costs the cache, never the
    run."""
    target = cache_dir() / name
    try:
        write_atomic(target, tensors, {"kind": kind, **meta})
        return True
    except OSError as exc:
        log.warning("could not write cache entry %s (%s); going on without it", target, exc)
        return False


def _load(name: str, kind: str, parse: Callable[[dict[str, torch.Tensor], dict[str, Any]], T]) -> T | None:
    """`parse(tensors, meta)` of one entry, or None (a miss: recomputed and overwritten) when it is absent,
    damaged (see `read_with_meta`), of another kind, or its contents do not fit together."""
    target = cache_dir() / name
    loaded = read_with_meta(target)
    if loaded is None:
        return None
    try:
        if loaded[1].get("kind") != kind:
            raise ValueError(f"not a {kind} entry")
        return parse(*loaded)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        log.warning("ignoring cache entry %s (%s: %s); recomputing it", target, type(exc).__name__, exc)
        return None


def save_activations(key: str, acts: list[LayerActivations], labels: np.ndarray) -> None:
    tensors = {"labels": torch.as_tensor(labels, dtype=torch.int64), **activation_tensors(acts)}
    _write(f"activations-{key}.safetensors", "activations", tensors, {"counts": [a.count for a in acts]})


def load_activations(key: str) -> tuple[list[LayerActivations], np.ndarray] | None:
    return _load(f"activations-{key}.safetensors", "activations",
                 lambda t, meta: (activations_from_tensors(t, meta["counts"]), t["labels"].numpy()))


def save_networks(key: str, networks: list[LayerNetworks]) -> None:
    tensors = {f"{i}.maps": torch.from_numpy(n.maps) for i, n in enumerate(networks)}
    meta = {"layers": [{"threshold": n.threshold, "converged": n.converged, "dead": n.dead_neurons} for n in networks]}
    _write(f"networks-{key}.safetensors", "networks", tensors, meta)


def load_networks(key: str) -> list[LayerNetworks] | None:
    def parse(t: dict[str, torch.Tensor], meta: dict[str, Any]) -> list[LayerNetworks]:
        out = []
        for i, m in enumerate(meta["layers"]):
            maps = t[f"{i}.maps"].numpy()
            out.append(LayerNetworks(maps, np.abs(maps) > m["threshold"], m["threshold"], m["converged"], m["dead"]))
        return out

    return _load(f"networks-{key}.safetensors", "networks", parse)


def save_evaluation(key: str, result: TaskResult) -> None:
    """A model's label scores under each template (the dense model's, which every compress of it repeats)."""
    tensors = {f"{name}.scores": r.scores for name, r in result.by_template.items() if r.scores is not None}
    if len(tensors) != len(result.by_template):
        return  # a result without scores cannot be rebuilt
    meta = {"templates": list(result.by_template), "seconds": [r.seconds for r in result.by_template.values()]}
    _write(f"evaluation-{key}.safetensors", "evaluation", tensors, meta)


def load_evaluation(key: str, sets: dict[str, list[Example]], task: TaskSpec) -> TaskResult | None:
    """The cached scores re-read as results for `sets` (accuracies recomputed from the scores)."""

    def parse(t: dict[str, torch.Tensor], meta: dict[str, Any]) -> TaskResult:
        if meta["templates"] != list(sets):
            raise ValueError("the entry's templates are not this evaluation's")
        by_name = {x.name: x for x in task.templates}
        results = {}
        for name, seconds in zip(meta["templates"], meta["seconds"], strict=True):
            scores, examples = t[f"{name}.scores"], sets[name]
            if task.kind == "multiple_choice":
                labels, words = [str(j) for j in range(scores.shape[1])], None
            else:
                labels, words = list(task.label_words), by_name[name].words(task.label_words)
                if scores.shape != (len(examples), len(labels)):
                    raise ValueError(f"template {name}: scores of shape {tuple(scores.shape)}")
            results[name] = scored(scores, examples, labels, choice_lengths(examples, words), seconds)
        return TaskResult.of(results, task, sets)

    return _load(f"evaluation-{key}.safetensors", "evaluation", parse)


def _write_json(name: str, data: Any) -> None:
    """One JSON entry, written atomically; like `_write`, a failure only costs the cache."""
    path = cache_dir() / name
    try:
        with replaced(path) as tmp:
            tmp.write_text(json.dumps(data), encoding="utf-8")
    except OSError as exc:
        log.warning("could not write cache entry %s (%s); going on without it", path, exc)


def _read_json(name: str) -> Any:
    """A JSON entry's data, or None when it is absent or damaged (a miss; a damaged one is named)."""
    path = cache_dir() / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, f"{type(exc).__name__}: {exc}")
        return None


def save_perplexity(key: str, result: PerplexityResult) -> None:
    """A model's perplexity (the dense model's, like its task scores), written atomically as JSON."""
    _write_json(f"perplexity-{key}.json", dataclasses.asdict(result))


def load_perplexity(key: str) -> PerplexityResult | None:
    try:
        return PerplexityResult(**_read_json(f"perplexity-{key}.json"))
    except TypeError:  # absent (None), or not this kind's fields
        return None


def save_lm_eval(key: str, result: dict[str, Any]) -> None:
    """A model's lm-eval results (fnprune.lm_eval_backend.run_lm_eval's; the dense model's), as JSON."""
    _write_json(f"lm-eval-{key}.json", result)


def load_lm_eval(key: str) -> dict[str, Any] | None:
    found = _read_json(f"lm-eval-{key}.json")
    return found if isinstance(found, dict) and isinstance(found.get("results"), dict) else None


def save_teacher(key: str, targets: TeacherTargets) -> None:
    """The dense model's top-k next-token distributions on the calibration prompts (recovery's teacher)."""
    _write(f"teacher-{key}.safetensors", "teacher", targets.tensors(), {})


def load_teacher(key: str) -> TeacherTargets | None:
    def parse(t: dict[str, torch.Tensor], meta: dict[str, Any]) -> TeacherTargets:
        targets = TeacherTargets(t["indices"], t["logprobs"], t["offsets"], t["label_ids"], t["label_logprobs"])
        if targets.indices.shape != targets.logprobs.shape or int(targets.offsets[-1]) != targets.indices.shape[0] \
                or targets.label_ids.shape != targets.label_logprobs.shape:
            raise ValueError("teacher tensors do not fit together")
        return targets

    return _load(f"teacher-{key}.safetensors", "teacher", parse)


def save_analysis_scores(key: str, scores: dict[str, np.ndarray]) -> bool:
    """The label scores of the interventions an analysis has run so far, by intervention (fnprune.analysis);
    False when the entry could not be written."""
    return _write(f"analysis-scores-{key}.safetensors", "analysis-scores",
                  {name: torch.from_numpy(np.ascontiguousarray(s)) for name, s in scores.items()}, {})


def load_analysis_scores(key: str) -> dict[str, np.ndarray]:
    """What `save_analysis_scores` saved under `key`; empty when there is nothing (or nothing usable)."""
    found = _load(f"analysis-scores-{key}.safetensors", "analysis-scores",
                  lambda t, meta: {name: s.numpy() for name, s in t.items()})
    return found or {}
