"""Functional networks of each layer: spatial ICA over MLP neurons (pure math; knows nothing of models).

As in fMRI spatial ICA, neurons are the samples and tokens the features: each neuron's activation over the
calibration tokens is z-scored, the neuron x token matrix is reduced by PCA to k components (through its
neuron Gram, which the tokens' second moments give, fnprune.moments), and FastICA unmixes k spatial maps (one
weight per neuron). Each map is z-scored across neurons; neurons with |z| > threshold are that network's members.

Modules: `maps` (LayerNetworks, pooling, task relevance), `whitening` (every whitening), `fastica` (the torch
FastICA and scikit-learn's), `engines` (the torch and reference engines), `find` (the stage the pipeline calls:
`find_all_networks`, and `find_networks` for one layer), `threads` (the torch engine's thread control).
"""

from __future__ import annotations

from .engines import REVISION
from .find import cache_identity, find_all_networks, find_networks
from .maps import LayerNetworks, network_relevance, networks_from_sources, pool_networks, zscore

__all__ = [
    "REVISION",
    "LayerNetworks",
    "cache_identity",
    "find_all_networks",
    "find_networks",
    "network_relevance",
    "networks_from_sources",
    "pool_networks",
    "zscore",
]
