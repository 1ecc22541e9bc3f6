"""Spatial ICA over many neurons at once (every layer's neurons concatenated): the PCA goes through the token
Gram matrix, so the width may far exceed the number of tokens."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import FastICA
from threadpoolctl import threadpool_limits

from ..networks import LayerNetworks, find_networks, networks_from_sources

__all__ = ["spatial_ica"]


def _zscore_rows(x: np.ndarray) -> np.ndarray:
    """Each row standardized (zero rows stay zero), in place for float arrays."""
    x -= x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    x /= np.where(std > 0, std, 1)
    return x


def spatial_ica(
    tokens: np.ndarray, components: int, threshold: float, seed: int, max_iter: int = 400, tol: float = 1e-4
) -> LayerNetworks:
    """Spatial ICA of `tokens` (T tokens, D neurons): the same maps as `networks.find_networks`, but the PCA
    goes through the T x T token Gram matrix, so D may be large (every layer's neurons concatenated).
    Runs with one BLAS thread: threaded LAPACK on these matrices is far slower on shared CPUs."""
    with threadpool_limits(1):
        return _spatial_ica(tokens, components, threshold, seed, max_iter, tol)


def _spatial_ica(
    tokens: np.ndarray, components: int, threshold: float, seed: int, max_iter: int, tol: float
) -> LayerNetworks:
    n_tokens, width = tokens.shape
    if width <= n_tokens:
        return find_networks(tokens, components, threshold, seed, max_iter, tol)
    if components >= n_tokens:
        raise ValueError(f"components ({components}) must be below the number of tokens ({n_tokens})")
    x = np.array(tokens, dtype=np.float32).T  # (D, T) copy
    if not np.isfinite(x).all():
        raise ValueError("activations contain NaN or inf")
    dead = int((x.std(axis=1) == 0).sum())
    _zscore_rows(x)
    x -= x.mean(axis=0, keepdims=True)
    eigval, eigvec = np.linalg.eigh((x.T @ x).astype(np.float64))  # (T, T), ascending
    top = np.argsort(eigval)[::-1][:components]
    if eigval[top[-1]] <= 1e-8 * max(eigval[top[0]], 1e-300):
        raise ValueError(f"activations have rank below {components} components; lower `components`")
    u = (x @ eigvec[:, top].astype(np.float32)).astype(np.float64) / np.sqrt(eigval[top])  # (D, k) orthonormal
    whitened = u * np.sqrt(width)
    ica = FastICA(n_components=components, whiten=False, fun="logcosh", max_iter=max_iter, tol=tol,
                  random_state=seed)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        sources = ica.fit_transform(whitened)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return networks_from_sources(sources.T, threshold, converged, dead)
