"""What a run depends on: library versions (for cache keys and the saved recipe) and the data files' hashes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
import transformers

from . import __version__
from .data import data_source
from .recipe import TaskSpec

__all__ = ["versions", "key_versions", "data_provenance", "file_sha256", "provenance_changes"]


def versions() -> dict[str, str]:
    return {
        "fnprune": __version__,
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "safetensors": str(safetensors.__version__),
        "scikit-learn": importlib.metadata.version("scikit-learn"),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
    }


def key_versions() -> dict[str, str]:
    """The versions a cache entry depends on: a new torch, transformers or fnprune recomputes it."""
    return {k: v for k, v in versions().items() if k in ("torch", "transformers", "fnprune")}


def data_provenance(task: TaskSpec, splits: list[str]) -> dict[str, Any]:
    """Each split's file and sha256 (or its Hub dataset), as the saved recipe records them."""
    out = {}
    for split in splits:
        path = data_source(task, split)
        out[split] = (
            {"file": str(path), "sha256": file_sha256(path)}
            if path
            else {"dataset": task.dataset, "config": task.dataset_config}
        )
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def provenance_changes(recorded: dict[str, Any]) -> list[str]:
    """What differs from a saved recipe's provenance (its data files' sha256, the key library versions): a rerun
    then does not reproduce that checkpoint byte for byte."""
    changes = []
    data, saved = recorded.get("data") or {}, recorded.get("versions") or {}
    if not isinstance(data, dict) or not isinstance(saved, dict):  # a hand-edited or damaged section: unreadable
        return ["its provenance section is not the mapping fnprune writes (provenance.data, provenance.versions)"]
    for split, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not entry.get("sha256"):
            continue
        path = Path(entry["file"])
        now = file_sha256(path) if path.is_file() else None
        if now != entry["sha256"]:
            changes.append(f"the {split} file {path} " + ("is gone" if now is None else "changed since (sha256)"))
    current = key_versions()
    changes += [f"{name} {saved[name]} -> {version}" for name, version in current.items()
                if name in saved and saved[name] != version]
    return changes
