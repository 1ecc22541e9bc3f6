"""A layer's functional networks: maps over its neurons, their members, pooling over runs, task relevance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LayerNetworks", "network_relevance", "networks_from_sources", "pool_networks", "zscore"]


@dataclass
class LayerNetworks:
    maps: np.ndarray  # (k, d) spatial maps, z-scored across neurons, heavy tail positive
    members: np.ndarray  # (k, d) bool, |z| > threshold
    threshold: float
    converged: bool
    dead_neurons: int  # neurons with zero variance over the calibration tokens


def zscore(x: np.ndarray, axis: int) -> np.ndarray:
    """x standardized along `axis`; constant slices become 0."""
    std = x.std(axis=axis, keepdims=True)
    return np.where(std > 0, (x - x.mean(axis=axis, keepdims=True)) / np.where(std > 0, std, 1), 0.0)


def networks_from_sources(sources: np.ndarray, threshold: float, converged: bool, dead: int) -> LayerNetworks:
    """A run's networks from its FastICA sources (k, d): each map z-scored across neurons and signed so its
    heavy tail is positive; neurons with |z| > threshold are members. Shared by both engines."""
    maps = zscore(np.asarray(sources, dtype=np.float64), axis=1)
    skew = (maps * maps * maps).mean(axis=1)  # products, not maps**3: NumPy's float pow is far slower here
    maps = maps * np.where(skew < 0, -1.0, 1.0)[:, None]
    return LayerNetworks(maps, np.abs(maps) > threshold, threshold, converged, dead)


def pool_networks(runs: list[LayerNetworks]) -> LayerNetworks:
    """One layer's networks from several ICA runs (different seeds), stacked as k x runs networks.

    FastICA from another start finds partly different components; pooled, a neuron's relevance-weighted
    membership is summed over the runs, so selection follows the networks the runs agree on rather than
    one run's draw.
    """
    if not runs:
        raise ValueError("no ICA runs to pool")
    if len(runs) == 1:
        return runs[0]
    return LayerNetworks(
        np.concatenate([r.maps for r in runs]), np.concatenate([r.members for r in runs]), runs[0].threshold,
        all(r.converged for r in runs), runs[0].dead_neurons,
    )


def network_relevance(
    maps: np.ndarray, decision: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None
) -> np.ndarray:
    """How strongly each network's activity at the decision token separates the labels, in [0, 1].

    Activity of network k on prompt n = sum_j z(decision[n, j]) * maps[k, j]; relevance is the correlation
    ratio (eta) of that activity with the label classes (|Pearson r| for two classes). With `groups` (the
    template of each prompt) each neuron is z-scored within its group, so what tells one prompt wording from
    another does not count as telling the labels apart.
    """
    decision = np.asarray(decision, dtype=np.float64)
    if groups is None:
        z = zscore(decision, axis=0)
    else:
        z = np.empty_like(decision)
        for g in np.unique(groups):
            z[groups == g] = zscore(decision[groups == g], axis=0)
    activity = z @ maps.T  # (N, k)
    labels = np.asarray(labels)
    total = ((activity - activity.mean(0)) ** 2).sum(0)
    between = np.zeros(maps.shape[0])
    for c in np.unique(labels):
        group = activity[labels == c]
        between += len(group) * (group.mean(0) - activity.mean(0)) ** 2
    return np.sqrt(np.where(total > 0, between / np.where(total > 0, total, 1), 0.0))
