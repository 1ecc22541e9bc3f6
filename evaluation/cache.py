"""On-disk cache of calibration (activations, ICA networks) and of result rows: safetensors + JSON, no pickle."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fnprune.cache import activation_tensors, activations_from_tensors
from fnprune.capture import LayerActivations
from fnprune.networks import LayerNetworks

__all__ = ["key_of", "save_activations", "load_activations", "save_networks", "load_networks", "RowCache"]


def key_of(info: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able settings dict."""
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def save_activations(directory: Path, acts: list[LayerActivations], labels: np.ndarray, info: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"labels": torch.from_numpy(np.asarray(labels, dtype=np.int64)), **activation_tensors(acts)}
    _atomic_tensors(directory / "activations.safetensors", tensors)
    _atomic_json(directory / "activations.json", {**info, "counts": [a.count for a in acts]})


def load_activations(directory: Path) -> tuple[list[LayerActivations], np.ndarray] | None:
    meta, data = directory / "activations.json", directory / "activations.safetensors"
    if not (meta.is_file() and data.is_file()):
        return None
    counts = json.loads(meta.read_text(encoding="utf-8"))["counts"]
    t = load_file(str(data))
    return activations_from_tensors(t, counts), t["labels"].numpy()


def save_networks(path: Path, nets: list[LayerNetworks], info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_tensors(path, {f"{i}.maps": torch.from_numpy(n.maps) for i, n in enumerate(nets)})
    meta = {**info, "converged": [n.converged for n in nets], "dead": [n.dead_neurons for n in nets]}
    _atomic_json(path.with_suffix(".json"), meta)


def load_networks(path: Path, threshold: float) -> list[LayerNetworks] | None:
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return None
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    t = load_file(str(path))
    out = []
    for i, (conv, dead) in enumerate(zip(meta["converged"], meta["dead"])):
        maps = t[f"{i}.maps"].numpy()
        out.append(LayerNetworks(maps, np.abs(maps) > threshold, threshold, conv, dead))
    return out


class RowCache:
    """One JSON file per finished result row, so an interrupted sweep resumes where it stopped."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, info: dict[str, Any]) -> Path:
        return self.dir / f"{key_of(info)}.json"

    def get(self, info: dict[str, Any]) -> dict[str, Any] | None:
        p = self._path(info)
        return json.loads(p.read_text(encoding="utf-8"))["row"] if p.is_file() else None

    def put(self, info: dict[str, Any], row: dict[str, Any]) -> None:
        _atomic_json(self._path(info), {"key": info, "row": row})
