"""Cross-layer ("group") networks, found by one ICA over every layer's neurons, and the IoU matching that
tells whether they recur in the ICA of other samples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..calibration import Calibration
from ..networks import network_relevance
from .group_ica import spatial_ica
from .spec import AnalysisSpec

__all__ = ["GroupNetworks", "concat_layers", "group_networks", "iou_matrix", "match_templates",
           "shuffle_within_layers"]


@dataclass
class GroupNetworks:
    """Cross-layer networks: maps over every layer's neurons concatenated (layer-major)."""

    maps: np.ndarray  # (k, D) z-scored
    members: np.ndarray  # (k, D) bool
    widths: list[int]  # neurons per layer; offsets = cumsum
    relevance: np.ndarray  # (k,)
    converged: bool

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.widths)])

    def layer_of(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.widths)), self.widths)

    def per_layer(self, k: int) -> list[np.ndarray]:
        """Network k's member indices within each layer."""
        off = self.offsets
        return [np.flatnonzero(self.members[k, off[i] : off[i + 1]]) for i in range(len(self.widths))]

    def by_relevance(self) -> np.ndarray:
        """Network ids, most task-relevant first (ties: lower id first)."""
        return np.argsort(-self.relevance, kind="stable")


def concat_layers(token_blocks: list[torch.Tensor | np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(t, dtype=np.float32) for t in token_blocks], axis=1)


def group_networks(calib: Calibration, spec: AnalysisSpec) -> GroupNetworks:
    """Group ICA over all layers' neurons from the calibration token sample (same tokens in every layer)."""
    acts = calib.activations
    n_tokens = acts[0].tokens.shape[0]
    rng = np.random.default_rng(spec.seed)
    rows = np.sort(rng.choice(n_tokens, min(spec.group_tokens, n_tokens), replace=False))
    x = concat_layers([a.tokens[rows] for a in acts])
    ica = spec.networks
    nets = spatial_ica(x, ica.components, ica.threshold, ica.seed, ica.max_iter, ica.tol)
    decision = concat_layers([a.decision for a in acts])
    rel = network_relevance(nets.maps, decision, calib.labels)
    return GroupNetworks(nets.maps, nets.members, [a.tokens.shape[1] for a in acts], rel, nets.converged)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every row of boolean `a` (K, D) with every row of `b` (M, D); empty vs empty = 0."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    inter = a32 @ b32.T
    union = a32.sum(1)[:, None] + b32.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_templates(templates: np.ndarray, maps: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(best IoU of each template among `maps`, whether it exceeds `threshold`)."""
    if maps.shape[0] == 0:
        best = np.zeros(templates.shape[0])
    else:
        best = iou_matrix(templates, maps).max(axis=1)
    return best, best > threshold


def shuffle_within_layers(members: np.ndarray, widths: list[int], rng: np.random.Generator) -> np.ndarray:
    """Null maps: each map's members permuted within each layer (same sizes per layer)."""
    out = np.empty_like(members)
    off = np.concatenate([[0], np.cumsum(widths)])
    for i in range(len(widths)):
        block = members[:, off[i] : off[i + 1]]
        out[:, off[i] : off[i + 1]] = np.take_along_axis(block, rng.permuted(
            np.tile(np.arange(widths[i]), (members.shape[0], 1)), axis=1), axis=1)
    return out
