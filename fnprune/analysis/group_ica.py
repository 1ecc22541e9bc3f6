"""Spatial ICA over many neurons at once (every layer's neurons concatenated): the PCA goes through the token
Gram matrix, so the width may far exceed the number of tokens."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from ..networks import LayerNetworks, networks_from_sources
from ..networks.engines import find_networks_reference
from ..networks.fastica import sklearn_fast_ica
from ..networks.whitening import reference_token_whitening

__all__ = ["spatial_ica"]


def spatial_ica(
    tokens: np.ndarray, components: int, threshold: float, seed: int, max_iter: int = 400, tol: float = 1e-4
) -> LayerNetworks:
    """Spatial ICA of `tokens` (T tokens, D neurons): the same maps as the reference engine, but when D > T the
    whitening goes through the T x T token Gram matrix, so D may be large. One BLAS thread: threaded LAPACK on
    these matrices is far slower on shared CPUs."""
    with threadpool_limits(1):
        if tokens.shape[1] <= tokens.shape[0]:
            return find_networks_reference(tokens, components, threshold, seed, max_iter, tol)
        whitened, dead = reference_token_whitening(tokens, components)  # (D, k)
        sources, converged = sklearn_fast_ica(whitened, seed, max_iter, tol)  # (k, D)
        return networks_from_sources(sources, threshold, converged, dead)
