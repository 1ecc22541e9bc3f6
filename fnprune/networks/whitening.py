"""Spatial-ICA whitening: a layer's data reduced to k white components (pure math; knows nothing of models).

In fnprune's spatial ICA the neurons are the samples and the tokens the features: each neuron's activation over
the calibration tokens is z-scored, each token centred across neurons, and the whitened data (d, k) are the top
k principal directions of that neuron x token matrix scaled to unit variance. They come from the neuron Gram
P R P (`SecondMoments.correlation_gram`, which moments accumulated batch by batch give) or, for a token sample
with fewer tokens than neurons, from the smaller T x T token Gram; never from a full SVD.

The torch engine's whitening (`layer_whitening`, from `whiten_gram`) takes the top eigenvectors by seeded
randomized block Krylov, subspace iteration or exact eigh. The reference engine's (`reference_gram_whitening`,
and `reference_token_whitening` for wide token samples) is NumPy's exact eigh. `whiten` is plain PCA whitening
of a data matrix, for tests and benchmarks on data that are not neuron activations.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..moments import SecondMoments, constant_columns
from .threads import one_thread

__all__ = [
    "Whitening",
    "check_sample",
    "layer_whitening",
    "reference_gram_whitening",
    "reference_token_whitening",
    "token_side",
    "whiten",
    "whiten_gram",
    "estimated_whitening_bytes",
]

ArrayLike = torch.Tensor | np.ndarray


class Whitening(NamedTuple):
    whitened: torch.Tensor  # (n_samples, k): zero mean, unit variance and uncorrelated columns
    components: torch.Tensor  # (k, n_features): principal axes, largest variance first
    explained: torch.Tensor  # (k,): fraction of the total variance along each axis


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



def _sign_fix(u: torch.Tensor) -> torch.Tensor:
    """Make each column's largest-magnitude entry positive, so eigen/singular vectors are deterministic."""
    idx = u.abs().argmax(dim=0)  # (k,)
    sign = torch.sign(u.gather(0, idx[None]))  # (1, k)
    return u * torch.where(sign == 0, torch.ones_like(sign), sign)


def _gaussian(rows: int, cols: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    """Seeded standard normal (rows, cols) drawn on the CPU in float64, so every device gets the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(like.device, like.dtype)


def _orthonormal(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of a tall y (m, l): CholeskyQR, a small (l, l) factorisation and one
    product (several times faster than Householder QR here), with Householder QR where y^T y is too
    ill-conditioned for Cholesky. Computed in float64."""
    y64 = y.to(torch.float64)
    with one_thread(y.device):
        chol, info = torch.linalg.cholesky_ex(y64.T @ y64)
        if int(info) == 0:
            q = torch.linalg.solve_triangular(chol.T, y64, upper=True, left=False)  # y R^-1, R = chol^T
            if torch.isfinite(q).all():
                return q.to(y.dtype)
        return torch.linalg.qr(y64).Q.to(y.dtype)


def _top_eig(
    sym: torch.Tensor, k: int, method: str, seed: int, oversample: int, power_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest k eigenvalues (k,) and eigenvectors (m, k) of a symmetric PSD matrix (m, m), largest first.

    "eigh" is exact. "randomized" is seeded subspace iteration (Halko et al. 2011, alg. 4.4 on the Gram) with
    `power_iters` iterations on k + `oversample` columns and a Rayleigh-Ritz step: O(m^2 (k + oversample)) per
    iteration instead of eigh's poorly parallel O(m^3). "krylov" is seeded randomized block Krylov (Musco and
    Musco 2015): Rayleigh-Ritz on the whole span of S G, S^2 G, ..., S^(power_iters + 1) G for a Gaussian G of
    k + `oversample` columns, which converges far faster than the last block alone when the spectrum has no gap
    (evaluation/RESULTS.md). Products use all threads; small factorisations run on one.
    """
    m = sym.shape[0]
    width = min(k + oversample, m)
    if method == "eigh" or (method == "krylov" and 2 * (power_iters + 1) * width > m):
        with one_thread(sym.device):  # small matrix: exact is cheap, and a Krylov basis could not fit
            eigval, eigvec = torch.linalg.eigh(sym)  # ascending
    elif method == "randomized":
        q = _orthonormal(sym @ _gaussian(m, width, seed, sym))
        for _ in range(power_iters):
            q = _orthonormal(sym @ q)  # (m, l)
        with one_thread(sym.device):
            eigval, small = torch.linalg.eigh(q.T @ sym @ q)  # (l,), (l, l) ascending
        eigvec = q @ small  # (m, l)
    elif method == "krylov":
        eigval, eigvec = _block_krylov(sym, width, seed, power_iters)
        if eigval.shape[0] < k:  # S has rank below k: the exact decomposition reports it the usual way
            return _top_eig(sym, k, "eigh", seed, oversample, power_iters)
    else:
        raise ValueError(f"unknown eigen method {method!r}; use 'eigh', 'randomized' or 'krylov'")
    return eigval.flip(0)[:k].clamp(min=0), _sign_fix(eigvec.flip(1)[:, :k])


def _block_krylov(sym: torch.Tensor, width: int, seed: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values (ascending) and vectors of sym (m, m) on an orthonormal basis of its block Krylov space.

    Each new block is projected off the basis, its directions below sqrt(eps) of the block dropped (when S has
    low rank the space stops growing, and normalising rounding noise would wreck the basis), the rest projected
    once more ("twice is enough", Giraud et al. 2005) and orthonormalised (CholeskyQR). S times each block is
    kept, so the Rayleigh-Ritz matrix needs no extra product with S.
    """
    floor = torch.finfo(sym.dtype).eps ** 0.5  # relative to the block before projection
    blocks: list[torch.Tensor] = []
    products: list[torch.Tensor] = []
    y = sym @ _gaussian(sym.shape[0], width, seed, sym)
    for _ in range(steps + 1):
        scale = float(y.norm(dim=0).max())
        if blocks:
            basis = torch.cat(blocks, 1)
            y = y - basis @ (basis.T @ y)
        y64 = y.to(torch.float64)
        with one_thread(sym.device):
            sv2, v = torch.linalg.eigh(y64.T @ y64)  # squared singular values of y, ascending
        new = sv2 > (floor * scale) ** 2
        if not bool(new.any()):
            break  # an invariant subspace: the basis already holds every eigenvector it can reach
        q = (y64 @ (v[:, new] * sv2[new].rsqrt())).to(sym.dtype)  # left singular vectors, roughly
        if blocks:  # the second projection: a direction with a small singular value carries rounding along the basis
            q = q - basis @ (basis.T @ q)
        blocks.append(_orthonormal(q))
        y = sym @ blocks[-1]
        products.append(y)
    basis = torch.cat(blocks, 1)  # (m, at most (steps + 1) width)
    ritz = basis.T @ torch.cat(products, 1)
    with one_thread(sym.device):
        eigval, small = torch.linalg.eigh((ritz + ritz.T) / 2)  # ascending
    return eigval, basis @ small


# (oversample, power_iters) of each eigen method when whitening (see `_top_eig`)
_EIG_DEFAULTS = {"krylov": (8, 8), "randomized": (32, 20), "eigh": (0, 0)}


def whiten_gram(
    gram: torch.Tensor, k: int, method: str = "krylov", seed: int = 0, oversample: int | None = None,
    power_iters: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened data (n, k) and explained-variance fractions (k,) from the n x n Gram of column-centred data.

    The whitened data are the top-k eigenvectors scaled to unit variance: nothing else of the data is needed,
    which is why the Gram can come from a stream (fnprune.moments) instead of a stored sample. `method`: see
    `_top_eig`; `oversample` and `power_iters` default to 8 and 8 for "krylov", 32 and 20 for "randomized".
    """
    if not 0 < k <= gram.shape[0]:
        raise ValueError(f"k ({k}) must be in 1..{gram.shape[0]}")
    oversample_default, iters_default = _EIG_DEFAULTS.get(method, (0, 0))
    eigval, eigvec = _top_eig(
        gram, k, method, seed,
        oversample_default if oversample is None else oversample,
        iters_default if power_iters is None else power_iters,
    )
    total = gram.diagonal().sum().clamp(min=torch.finfo(gram.dtype).tiny)
    return eigvec * gram.shape[0] ** 0.5, eigval / total


def _range_finder_svd(
    x: torch.Tensor, k: int, seed: int, oversample: int, power_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k squared singular values (k,) and left singular vectors (n, k) of x (n, f), never forming a Gram.

    Seeded randomized range finder with power iterations (Halko et al. 2011, alg. 4.4): one power iteration is
    one multiplication by x x^T, as one subspace iteration on the Gram is.
    """

    def orth(y: torch.Tensor) -> torch.Tensor:
        with one_thread(y.device):
            return torch.linalg.qr(y).Q

    q = orth(x @ _gaussian(x.shape[1], min(k + oversample, *x.shape), seed, x))  # (n, l)
    for _ in range(power_iters):
        q = orth(x @ orth(x.T @ q))  # (n, l)
    b = q.T @ x  # (l, f)
    with one_thread(x.device):
        ub, s, _ = torch.linalg.svd(b, full_matrices=False)  # (l, l), (l,)
    return s[:k].pow(2), _sign_fix(q @ ub[:, :k])


def whiten(
    x: ArrayLike,
    k: int,
    method: str = "gram",
    seed: int = 0,
    oversample: int = 32,
    power_iters: int = 20,
) -> Whitening:
    """PCA whitening of x (n_samples, n_features) to k columns of zero mean and unit variance across samples.

    "gram": exact eigendecomposition (torch.linalg.eigh) of the smaller of the sample Gram (n x n) and the
    feature covariance (f x f): the subspace scikit-learn's full SVD gives. "randomized": a seeded range finder
    with `power_iters` power iterations and `oversample` extra directions, deterministic for a seed; it runs on
    the smaller Gram when forming that costs less than the passes over x, else on x itself. With the defaults
    it reproduces the exact subspace in a fraction of eigh's time.
    """
    x = torch.as_tensor(x)
    n, f = x.shape
    small, large = min(n, f), max(n, f)
    if not 0 < k <= small:
        raise ValueError(f"k ({k}) must be in 1..min(n_samples, n_features) = {small}")
    if method not in ("gram", "randomized"):
        raise ValueError(f"unknown whitening method {method!r}; use 'gram' or 'randomized'")
    xc = x - x.mean(dim=0, keepdim=True)  # centre every feature across samples
    tiny = torch.finfo(x.dtype).tiny
    width = min(k + oversample, small)
    gram_cost = small * small * (large + power_iters * width)  # form the Gram, then iterate on it
    eig = "eigh" if method == "gram" else "randomized"
    if method == "randomized" and gram_cost > (2 * power_iters + 2) * n * f * width:
        eigval, u = _range_finder_svd(xc, k, seed, oversample, power_iters)  # (k,), (n, k)
    elif n <= f:
        eigval, u = _top_eig(xc @ xc.T, k, eig, seed, oversample, power_iters)
    else:
        eigval, v = _top_eig(xc.T @ xc, k, eig, seed, oversample, power_iters)  # (k,), (f, k)
        u = _sign_fix(xc @ v / eigval.sqrt().clamp(min=tiny))  # (n, k) unit columns: x v = u s
    components = (u.T @ xc) / eigval.sqrt().clamp(min=tiny)[:, None]  # (k, f) principal axes: u^T x = s v^T
    return Whitening(u * n**0.5, components, eigval / xc.pow(2).sum().clamp(min=tiny))


def _as_moments(data: ArrayLike | SecondMoments, device, dtype: torch.dtype) -> SecondMoments:
    if isinstance(data, SecondMoments):
        return data
    return SecondMoments.of(torch.as_tensor(data).to(device=device, dtype=dtype), dtype)


def token_side(sample: ArrayLike | SecondMoments) -> bool:
    """Whiten from the token Gram (T x T) rather than the neuron Gram (d x d): a stored token sample with
    fewer tokens than neurons, as wide MLPs keep (Llama-7B: 4,096 tokens x 11,008 neurons)."""
    return not isinstance(sample, SecondMoments) and sample.shape[0] < sample.shape[1]


def _token_gram_whitening(
    tokens: ArrayLike, components: int, seed: int, eig_method: str, device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Spatial-ICA whitening (d, k), explained fractions (k,) and dead neurons of a token sample (T, d), T < d.

    With Z (d, T) the spatial-ICA data (each neuron z-scored over tokens, each token centred across neurons),
    the neuron Gram Z Z^T / T (what `SecondMoments.correlation_gram` gives) and the token Gram Z^T Z / T share
    their nonzero eigenvalues, and the neuron-side eigenvectors are u = Z v / sqrt(T lambda) for the token-side
    ones v: the same whitening, from T^2 instead of d^2 values and T^2 d instead of T d^2 multiply-adds.
    """
    x = torch.as_tensor(tokens).to(device)  # (T, d) in the storage dtype
    n = x.shape[0]
    dead = constant_columns(x)
    mean = x.mean(0, dtype=torch.float64)  # (d,)
    z = x.to(dtype) - mean.to(dtype)  # (T, d) centred, in the working dtype (float16 samples are widened)
    var = torch.linalg.vector_norm(z, dim=0, dtype=torch.float64).square_() / n  # (d,) summed in float64
    inv = torch.where(dead, 0.0, var.clamp(min=torch.finfo(torch.float64).tiny).rsqrt())
    z = z.mul_(inv.to(dtype)).T  # (d, T) z-scored neurons
    if dead.any():  # each token centred across the live neurons: dead ones stay 0, not an outlier cluster
        z[~dead] -= z[~dead].mean(0, keepdim=True)
    else:
        z -= z.mean(0, keepdim=True)  # each token centred across neurons
    gram = z.T @ z / n  # (T, T)
    eigval, v = _top_eig(gram, components, eig_method, seed, *_EIG_DEFAULTS.get(eig_method, (0, 0)))  # (k,), (T, k)
    u = _sign_fix(z @ v / (eigval * n).sqrt().clamp(min=torch.finfo(dtype).tiny))  # (d, k) unit columns
    total = gram.diagonal().sum().clamp(min=torch.finfo(dtype).tiny)
    return u * z.shape[0] ** 0.5, eigval / total, int(dead.sum())


def layer_whitening(
    sample: ArrayLike | SecondMoments, components: int, seed: int, eig_method: str, device, dtype: torch.dtype
) -> tuple[torch.Tensor, int]:
    """Checked spatial-ICA whitening (d, k) of one layer and its dead-neuron count, from its moments or its
    token sample (through the smaller of the two Grams)."""
    check_sample(sample, components)
    if token_side(sample):
        whitened, explained, dead = _token_gram_whitening(sample, components, seed, eig_method, device, dtype)
        exact = dtype == torch.float64
    else:
        moments = _as_moments(sample, device, torch.float64)
        gram = moments.correlation_gram(dtype).to(device)
        whitened, explained = whiten_gram(gram, components, eig_method, seed)  # (d, k), (k,)
        exact, dead = moments.dtype == dtype == torch.float64, int(moments.constant.sum())
    floor = 1e-10 if exact else 1e-5  # relative eigenvalue noise of a rank-deficient Gram
    if explained[-1] <= floor * max(float(explained[0]), 1e-300):
        raise ValueError(f"activations have rank below {components} components; lower `components`")
    return whitened.to(dtype), dead


def estimated_whitening_bytes(layer: ArrayLike | SecondMoments) -> int:
    """Rough peak working memory of one layer's whitening: from moments, the d x d float64 covariance and
    float32 Gram; from T < d tokens (`token_side`), a working copy of them in the whitening dtype with room
    for its reductions' temporaries, and the T x T Gram; from more tokens than neurons, their float64 copy and
    moments, and the neuron Gram."""
    if isinstance(layer, SecondMoments):
        return 12 * layer.width**2
    rows, width = layer.shape
    if token_side(layer):
        return 12 * rows * width + 8 * rows**2
    return 20 * width**2 + 8 * rows * width



def _top_eigh_numpy(sym: np.ndarray, k: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Largest k eigenvalues (k,) and eigenvectors (m, k) of a symmetric matrix by NumPy's eigh, largest first;
    ValueError when the k-th is below `floor` times the first (the data have rank below k)."""
    eigval, eigvec = np.linalg.eigh(sym)  # ascending
    top = np.argsort(eigval)[::-1][:k]
    if eigval[top[-1]] <= floor * max(eigval[top[0]], 1e-300):
        raise ValueError(f"activations have rank below {k} components; lower `components`")
    return eigval[top], eigvec[:, top]


def reference_gram_whitening(gram: np.ndarray, components: int) -> np.ndarray:
    """The reference engine's whitened data (d, k) from the neuron Gram P R P: its top eigenvectors scaled to
    unit variance, each signed so its largest-magnitude entry is positive (LAPACK's signs vary by build, and
    FastICA's start depends on them)."""
    _, vec = _top_eigh_numpy(np.asarray(gram, dtype=np.float64), components, 1e-10)
    vec = vec * np.sign(vec[np.abs(vec).argmax(axis=0), np.arange(components)])
    return vec * np.sqrt(gram.shape[0])


def reference_token_whitening(tokens: np.ndarray, components: int) -> tuple[np.ndarray, int]:
    """Whitened data (D, k) float64 and dead-neuron count of a token sample (T, D) with more neurons than
    tokens (fnprune.analyze's group ICA over every layer's neurons at once), from the T x T token Gram in
    float32 and NumPy's eigh; the eigenvectors keep LAPACK's signs."""
    n_tokens = tokens.shape[0]
    if components >= n_tokens:
        raise ValueError(f"components ({components}) must be below the number of tokens ({n_tokens})")
    x = np.array(tokens, dtype=np.float32).T  # (D, T) copy
    if not np.isfinite(x).all():
        raise ValueError("activations contain NaN or inf")
    constant = x.std(axis=1) == 0
    dead = int(constant.sum())
    x -= x.mean(axis=1, keepdims=True)  # each neuron z-scored over tokens (constant ones stay 0)
    std = x.std(axis=1, keepdims=True)
    x /= np.where(std > 0, std, 1)
    if dead:  # each token centred across the live neurons: dead ones stay 0, not an outlier cluster
        x[~constant] -= x[~constant].mean(axis=0, keepdims=True)
    else:
        x -= x.mean(axis=0, keepdims=True)  # each token centred across neurons
    eigval, eigvec = _top_eigh_numpy((x.T @ x).astype(np.float64), components, 1e-8)  # from (T, T)
    u = (x @ eigvec.astype(np.float32)).astype(np.float64) / np.sqrt(eigval)  # (D, k) orthonormal
    return u * np.sqrt(x.shape[0]), dead
