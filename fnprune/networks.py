"""Functional networks of one layer: spatial ICA over MLP neurons (pure math; knows nothing of models).

As in fMRI spatial ICA, neurons are the samples and tokens the features: each neuron's activation over the
calibration tokens is z-scored, the neuron x token matrix is reduced by PCA to k components (through its
neuron Gram, which the tokens' second moments give, fnprune.moments), and FastICA unmixes k spatial maps
(one weight per neuron). Each map is z-scored across neurons; neurons with
|z| > threshold are that network's members.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .moments import SecondMoments

__all__ = [
    "LayerNetworks", "check_sample", "find_networks", "network_relevance", "networks_from_sources", "pool_networks",
    "whitening",
]


@dataclass
class LayerNetworks:
    maps: np.ndarray  # (k, d) spatial maps, z-scored across neurons, heavy tail positive
    members: np.ndarray  # (k, d) bool, |z| > threshold
    threshold: float
    converged: bool
    dead_neurons: int  # neurons with zero variance over the calibration tokens


def _zscore(x: np.ndarray, axis: int) -> np.ndarray:
    std = x.std(axis=axis, keepdims=True)
    return np.where(std > 0, (x - x.mean(axis=axis, keepdims=True)) / np.where(std > 0, std, 1), 0.0)


def whitening(gram: np.ndarray, components: int) -> np.ndarray:
    """Spatial-ICA whitened data (d, k) from the neuron Gram P R P (`SecondMoments.correlation_gram`): its top
    eigenvectors scaled to unit variance, each signed so its largest-magnitude entry is positive (LAPACK's
    signs vary by build, and FastICA's start depends on them)."""
    eigval, eigvec = np.linalg.eigh(np.asarray(gram, dtype=np.float64))  # ascending
    top = np.argsort(eigval)[::-1][:components]
    if eigval[top[-1]] <= 1e-10 * max(eigval[top[0]], 1e-300):
        raise ValueError(f"activations have rank below {components} components; lower `components`")
    vec = eigvec[:, top]
    vec = vec * np.sign(vec[np.abs(vec).argmax(axis=0), np.arange(components)])
    return vec * np.sqrt(gram.shape[0])


def find_networks(
    tokens: np.ndarray | SecondMoments,
    components: int,
    threshold: float,
    seed: int,
    max_iter: int = 400,
    tol: float = 1e-4,
    runs: int = 1,
) -> LayerNetworks:
    """ICA maps of one layer from its token activations `tokens` (T tokens, d neurons) or their moments.

    The reference engine: numpy eigh whitening and scikit-learn's FastICA. `runs` > 1 repeats FastICA from
    seeds seed, seed + 1, ... on the same (deterministic) whitening and pools the networks (`pool_networks`):
    the same result as pooling separate calls, for one whitening's cost.
    """
    moments = tokens if isinstance(tokens, SecondMoments) else SecondMoments.of(np.asarray(tokens, np.float64))
    check_sample(moments, components)
    dead = int(moments.constant.sum())
    whitened = whitening(moments.correlation_gram().numpy(), components)  # (d, k), unit variance per component
    from sklearn.decomposition import FastICA  # imported here: scikit-learn + SciPy cost ~150 MiB of RSS
    from sklearn.exceptions import ConvergenceWarning

    found = []
    for run_seed in range(seed, seed + runs):
        ica = FastICA(
            n_components=components, whiten=False, fun="logcosh", max_iter=max_iter, tol=tol, random_state=run_seed
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            sources = ica.fit_transform(whitened)  # (d, k)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        found.append(networks_from_sources(sources.T, threshold, converged, dead))
    return pool_networks(found)


def check_sample(sample: SecondMoments | np.ndarray | torch.Tensor, components: int) -> None:
    """Refuse a layer's token sample (T, d), or its moments, that spatial ICA cannot unmix into `components`
    maps (ValueError)."""
    if isinstance(sample, SecondMoments):
        finite, (count, width) = sample.finite(), (sample.count, sample.width)
    else:
        t = torch.as_tensor(sample)
        finite, (count, width) = bool(torch.isfinite(t).all()), t.shape
    if not finite:
        raise ValueError("activations contain NaN or inf")
    if components >= min(count, width):
        raise ValueError(
            f"components ({components}) must be smaller than both the number of tokens ({count}) "
            f"and of neurons ({width})"
        )


def networks_from_sources(sources: np.ndarray, threshold: float, converged: bool, dead: int) -> LayerNetworks:
    """A run's networks from its FastICA sources (k, d): each map z-scored across neurons and signed so its
    heavy tail is positive; neurons with |z| > threshold are members. Shared by both engines."""
    maps = _zscore(np.asarray(sources, dtype=np.float64), axis=1)
    skew = (maps * maps * maps).mean(axis=1)  # products, not maps**3: NumPy's float pow is 50x slower here
    maps = maps * np.where(skew < 0, -1.0, 1.0)[:, None]
    return LayerNetworks(maps, np.abs(maps) > threshold, threshold, converged, dead)


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
        z = _zscore(decision, axis=0)
    else:
        z = np.empty_like(decision)
        for g in np.unique(groups):
            z[groups == g] = _zscore(decision[groups == g], axis=0)
    activity = z @ maps.T  # (N, k)
    labels = np.asarray(labels)
    total = ((activity - activity.mean(0)) ** 2).sum(0)
    between = np.zeros(maps.shape[0])
    for c in np.unique(labels):
        group = activity[labels == c]
        between += len(group) * (group.mean(0) - activity.mean(0)) ** 2
    return np.sqrt(np.where(total > 0, between / np.where(total > 0, total, 1), 0.0))


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
