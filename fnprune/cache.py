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
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .capture import LayerActivations
from .data import Example
from .evaluate import TaskResult, choice_lengths, scored
from .moments import SecondMoments
from .networks import LayerNetworks
from .perplexity import PerplexityResult
from .recipe import TaskSpec
from .safetensors_io import read_with_meta, write_atomic

__all__ = [
    "activation_tensors", "activations_from_tensors", "cache_dir", "cache_key", "capture_progress_path",
    "save_activations",
    "load_activations", "save_networks", "load_networks", "save_evaluation", "load_evaluation", "save_perplexity",
    "load_perplexity",
]


def cache_dir() -> Path:
    """$FNPRUNE_CACHE_DIR, else ~/.cache/fnprune."""
    return Path(os.environ.get("FNPRUNE_CACHE_DIR", "~/.cache/fnprune")).expanduser()


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def model_fingerprint(name_or_path: str, revision: str | None) -> dict[str, Any]:
    """Local weights by name, size and mtime (cheap); Hub models by id and revision."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return {"hub": name_or_path, "revision": revision}
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"files": [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]}


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


def save_activations(key: str, acts: list[LayerActivations], labels: np.ndarray) -> None:
    tensors = {"labels": torch.as_tensor(labels, dtype=torch.int64), **activation_tensors(acts)}
    write_atomic(cache_dir() / f"activations-{key}.safetensors", tensors, {"counts": [a.count for a in acts]})


def load_activations(key: str) -> tuple[list[LayerActivations], np.ndarray] | None:
    loaded = read_with_meta(cache_dir() / f"activations-{key}.safetensors")
    if loaded is None:
        return None
    t, meta = loaded
    return activations_from_tensors(t, meta["counts"]), t["labels"].numpy()


def save_networks(key: str, networks: list[LayerNetworks]) -> None:
    tensors = {f"{i}.maps": torch.from_numpy(n.maps) for i, n in enumerate(networks)}
    meta = {"layers": [{"threshold": n.threshold, "converged": n.converged, "dead": n.dead_neurons} for n in networks]}
    write_atomic(cache_dir() / f"networks-{key}.safetensors", tensors, meta)


def load_networks(key: str) -> list[LayerNetworks] | None:
    loaded = read_with_meta(cache_dir() / f"networks-{key}.safetensors")
    if loaded is None:
        return None
    t, meta = loaded
    out = []
    for i, m in enumerate(meta["layers"]):
        maps = t[f"{i}.maps"].numpy()
        out.append(LayerNetworks(maps, np.abs(maps) > m["threshold"], m["threshold"], m["converged"], m["dead"]))
    return out


def save_evaluation(key: str, result: TaskResult, task: TaskSpec) -> None:
    """A model's label scores under each template (the dense model's, which every compress of it repeats)."""
    tensors = {f"{name}.scores": r.scores for name, r in result.by_template.items() if r.scores is not None}
    if len(tensors) != len(result.by_template):
        return  # a result without scores cannot be rebuilt
    meta = {"templates": list(result.by_template), "seconds": [r.seconds for r in result.by_template.values()]}
    write_atomic(cache_dir() / f"evaluation-{key}.safetensors", tensors, meta)


def load_evaluation(key: str, sets: dict[str, list[Example]], task: TaskSpec) -> TaskResult | None:
    loaded = read_with_meta(cache_dir() / f"evaluation-{key}.safetensors")
    if loaded is None:
        return None
    t, meta = loaded
    if meta.get("templates") != list(sets):
        return None
    held = {x.name for x in task.held_out_templates()}
    by_name = {x.name: x for x in task.templates}
    results = {}
    for name, seconds in zip(meta["templates"], meta["seconds"]):
        scores, examples = t[f"{name}.scores"], sets[name]
        if task.kind == "multiple_choice":
            labels, words = [str(j) for j in range(scores.shape[1])], None
        else:
            labels, words = list(task.label_words), by_name[name].words(task.label_words)
        results[name] = scored(scores, examples, labels, choice_lengths(examples, words), seconds)
    return TaskResult(results, [n for n in results if n in held])


def save_perplexity(key: str, result: PerplexityResult) -> None:
    """A model's perplexity (the dense model's, like its task scores), written atomically as JSON."""
    path = cache_dir() / f"perplexity-{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(result)), encoding="utf-8")
    tmp.replace(path)


def load_perplexity(key: str) -> PerplexityResult | None:
    path = cache_dir() / f"perplexity-{key}.json"
    try:
        return PerplexityResult(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
