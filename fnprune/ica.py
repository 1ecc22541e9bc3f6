"""ICA engine in torch (pure math: CPU or CUDA, float32 or float64; knows nothing of models or files).

The same algorithm and conventions as scikit-learn's parallel FastICA (`_ica_par`), which stays the reference in
the tests, without its costs on our shapes:
- whitening needs only the top k principal directions, so it comes from a Gram/covariance matrix (which can be
  accumulated batch by batch, fnprune.moments) by seeded randomized block Krylov, or from the data by a seeded
  randomized range finder, never a full SVD;
- FastICA starts from scikit-learn's own random matrix for a seed (`sklearn_init`), so for the same whitening
  and seed the two engines run the same iterations up to rounding;
- several restarts, several runs and several layers go through the fixed-point loop as one batch
  (`find_networks_batch`); the restarts' agreement measures how reproducible the components are;
- small LAPACK calls (eigh, Cholesky, QR) run on one CPU thread: on a shared machine torch's threaded LAPACK was
  measured 10-300x slower than single-threaded (threads spin while waiting); big products use every thread,
  except in `find_networks_batch`, which shares whole layers out to one single-threaded worker per core.

Shapes follow scikit-learn: data are (n_samples, n_features). In fnprune's spatial ICA the samples are neurons
and the features are tokens (see fnprune.networks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
import torch

from .moments import SecondMoments
from .networks import LayerNetworks, check_sample, networks_from_sources, pool_networks

__all__ = [
    "REVISION",
    "IcaResult",
    "Whitening",
    "fast_ica",
    "find_networks_batch",
    "find_networks_torch",
    "sklearn_init",
    "match_components",
    "whiten",
    "whiten_gram",
]

ArrayLike = torch.Tensor | np.ndarray
# Bumped whenever this engine's networks change for the same inputs and settings, so caches keyed on it
# recompute: 3 = block Krylov whitening, every CPU kernel single-threaded (networks no longer depend on the
# core count). Not bumped for whitening stored token samples of wide MLPs (T < d) from the token Gram: the same
# whitening as the neuron Gram's up to rounding (tests: 1e-9 with exact eigh), and moment-stored layers are
# untouched, so networks cached by code 3 stay as good as recomputed ones.
REVISION = 3
_T = TypeVar("_T")
_R = TypeVar("_R")


class Whitening(NamedTuple):
    whitened: torch.Tensor  # (n_samples, k): zero mean, unit variance and uncorrelated columns
    components: torch.Tensor  # (k, n_features): principal axes, largest variance first
    explained: torch.Tensor  # (k,): fraction of the total variance along each axis


@dataclass
class IcaResult:
    sources: torch.Tensor  # (n_samples, k) independent components of the first run
    unmixing: torch.Tensor  # (k, k) W of the first run: sources = whitened @ W.T
    n_iter: int  # iterations of the first run
    converged: bool  # the first run reached tol before max_iter
    stability: float | None = None  # restarts > 1: mean matched |corr| of the other runs' components with run 0's
    component_stability: torch.Tensor | None = None  # (k,) the same per component of run 0


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's (process-wide) intra-op thread count set to n inside the block; None leaves it alone."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _one_thread(device: str | torch.device, small: bool = True):
    """Run the block on one CPU thread (on other devices, or when not `small`, nothing changes)."""
    return _torch_threads(1 if torch.device(device).type == "cpu" and small else None)


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
    with _one_thread(y.device):
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
    (SmolLM2's neuron Grams in float32: 1 - cos of the subspace 4e-7 to 8e-7 with 8 steps against up to 1.4e-5
    for 20 subspace iterations, in 2/3 of the time). Products use all threads; small factorisations run on one.
    """
    m = sym.shape[0]
    width = min(k + oversample, m)
    if method == "eigh" or (method == "krylov" and 2 * (power_iters + 1) * width > m):
        with _one_thread(sym.device):  # small matrix: exact is cheap, and a Krylov basis could not fit
            eigval, eigvec = torch.linalg.eigh(sym)  # ascending
    elif method == "randomized":
        q = _orthonormal(sym @ _gaussian(m, width, seed, sym))
        for _ in range(power_iters):
            q = _orthonormal(sym @ q)  # (m, l)
        with _one_thread(sym.device):
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
        with _one_thread(sym.device):
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
    with _one_thread(sym.device):
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
        with _one_thread(y.device):
            return torch.linalg.qr(y).Q

    q = orth(x @ _gaussian(x.shape[1], min(k + oversample, *x.shape), seed, x))  # (n, l)
    for _ in range(power_iters):
        q = orth(x @ orth(x.T @ q))  # (n, l)
    b = q.T @ x  # (l, f)
    with _one_thread(x.device):
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
    it reproduces the exact subspace (cosines > 0.9999999 on SmolLM2 activations) in a fraction of eigh's time.
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


def _nonlinearity(u: torch.Tensor, fun: str) -> tuple[torch.Tensor, torch.Tensor]:
    """g(u) and the sample mean of g'(u) for u (..., k, n), as scikit-learn's _logcosh / _cube (alpha = 1).
    logcosh overwrites u with g(u)."""
    if fun == "logcosh":
        gu = torch.tanh_(u)  # in place: u is a temporary of the caller's, as large as the data
        # mean(1 - g^2) as 1 - ||g||^2 / n: one fused reduction, several times faster than the elementwise form
        return gu, 1 - torch.linalg.vector_norm(gu, dim=-1).pow(2) / u.shape[-1]
    if fun == "cube":
        return u.pow(3), 3 * u.pow(2).mean(-1)
    raise ValueError(f"unknown FastICA nonlinearity {fun!r}; use 'logcosh' or 'cube'")


def _sym_decorrelation(w: torch.Tensor) -> torch.Tensor:
    """W <- (W W^T)^{-1/2} W for a batch of square matrices (..., k, k)."""
    s, u = torch.linalg.eigh(w @ w.mT)
    # Relative floor: a (near) rank-deficient W W^T would otherwise blow W up (to inf in float32).
    s = torch.maximum(s, s.amax(-1, keepdim=True) * torch.finfo(w.dtype).eps).clamp(min=torch.finfo(w.dtype).tiny)
    return (u * s.rsqrt()[..., None, :]) @ u.mT @ w


def _matched_abs_corr(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per-row |corr| of a (k, n) with b (m, n) under the best one-to-one matching, and the matched b rows."""
    a = torch.as_tensor(a).to(torch.float64)
    b = torch.as_tensor(b).to(a.device, torch.float64)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    a = a / a.norm(dim=1, keepdim=True).clamp(min=1e-300)
    b = b / b.norm(dim=1, keepdim=True).clamp(min=1e-300)
    corr = (a @ b.T).abs().cpu().numpy()  # (k, m)
    from scipy.optimize import linear_sum_assignment  # only for comparing runs; SciPy is heavy to import

    rows, cols = linear_sum_assignment(corr, maximize=True)
    per_row, perm = np.zeros(a.shape[0]), np.full(a.shape[0], -1)
    per_row[rows], perm[rows] = corr[rows, cols], cols
    return per_row, perm


def match_components(a: ArrayLike, b: ArrayLike) -> tuple[float, np.ndarray]:
    """Agreement of two component sets a (k, n) and b (k, n), up to sign and order.

    Returns the mean |Pearson corr| over the best one-to-one (Hungarian) matching, and `perm` with b[perm[i]]
    the match of a[i].
    """
    per_row, perm = _matched_abs_corr(a, b)
    return float(per_row[perm >= 0].mean()), perm


def sklearn_init(seed: int, k: int, restarts: int = 1) -> torch.Tensor:
    """FastICA starting matrices (restarts, k, k) float64: scikit-learn's for `seed` first.

    scikit-learn draws w_init = RandomState(seed).normal(size=(k, k)) when whiten=False; the restarts continue
    that stream, so start 0 is exactly scikit-learn's whatever `restarts` is.
    """
    draws = np.random.RandomState(seed).normal(size=(restarts * k, k))
    return torch.from_numpy(draws).reshape(restarts, k, k)


def fast_ica(
    whitened: ArrayLike,
    fun: str = "logcosh",
    max_iter: int = 200,
    tol: float = 1e-4,
    seed: int = 0,
    restarts: int = 1,
    w_init: ArrayLike | None = None,
) -> IcaResult:
    """Parallel FastICA of whitened data (n_samples, k): scikit-learn's `_ica_par` fixed point, in torch.

    W <- sym_decorrelation(E[g(WX) X^T] - E[g'(WX)] W) until max_i |abs(diag(W1 W^T)) - 1| < tol. The starts
    are scikit-learn's for `seed` (`sklearn_init`) and run as one batch. Run 0 is returned; the others only
    measure how reproducible its components are (`stability`, 1 = identical). `w_init` (k, k) replaces run 0's
    start.
    """
    x = torch.as_tensor(whitened).T  # (k, n): scikit-learn's X1
    k = x.shape[0]
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    _nonlinearity(x[:1, :1].clone(), fun)  # reject an unknown `fun` before any work (logcosh overwrites u)
    init = sklearn_init(seed, k, restarts).to(x.device, x.dtype)  # (R, k, k)
    if w_init is not None:
        init[0] = torch.as_tensor(w_init).to(x.device, x.dtype)
    # Per-iteration work is O(R k^2 n): small problems stay on one thread (see the module doc).
    with _one_thread(x.device, small=restarts * k * k * x.shape[1] < 50_000_000):
        w, n_iter, converged = _ica_par(x[None], init[None], fun, max_iter, tol)
        w, n_iter, converged = w[0], n_iter[0], converged[0]
        sources = w @ x  # (R, k, n)
    result = IcaResult(sources[0].T, w[0], int(n_iter[0]), bool(converged[0]))
    if restarts > 1:
        per = np.stack([_matched_abs_corr(sources[0], sources[r])[0] for r in range(1, restarts)])  # (R-1, k)
        result.stability = float(per.mean())
        result.component_stability = torch.from_numpy(per.mean(0))
    return result


def _ica_par(
    x: torch.Tensor, init: torch.Tensor, fun: str, max_iter: int, tol: float, on_iter=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed-point loop for L data sets X (L, k, n), each from R starts (L, R, k, k), all as one batch.

    The data are shared by their R runs (broadcast, never copied). A run stops moving when it converges; a data
    set whose runs have all converged leaves the batch. Returns W (L, R, k, k), iterations and converged (L, R).
    """
    n = x.shape[-1]
    w = _sym_decorrelation(init)  # (L, R, k, k)
    n_iter = torch.full(w.shape[:2], max_iter, dtype=torch.long)
    converged = torch.zeros(w.shape[:2], dtype=torch.bool)
    active = torch.arange(w.shape[0], device=w.device)  # data sets with a run still iterating
    xa, wa, moving = x, w, torch.ones(w.shape[:2], dtype=torch.bool, device=w.device)
    runs, k = w.shape[1], w.shape[2]
    for it in range(max_iter):
        # The R runs' unmixing rows stacked, (A, R k, k) @ (A, k, n): one product per data set, X not copied.
        gu, gpu = _nonlinearity(wa.flatten(1, 2) @ xa, fun)  # (A, R k, n), (A, R k)
        step = (gu @ xa.mT / n).unflatten(1, (runs, k))  # (A, R, k, k)
        del gu
        step = step - gpu.unflatten(1, (runs, k))[..., None] * wa
        if bool(moving.all()):
            w1 = _sym_decorrelation(step)
        else:  # the decorrelation (an eigh per run, the loop's main cost) only for the runs still moving
            w1 = wa.clone()
            w1[moving] = _sym_decorrelation(step[moving])
        done = (((w1 * wa).sum(-1).abs() - 1).abs().amax(-1) < tol) & moving  # (A, R) newly converged
        wa = w1
        w[active] = wa
        if on_iter is not None:
            on_iter()
        if done.any():
            sets, which = done.nonzero(as_tuple=True)
            n_iter[active[sets].cpu(), which.cpu()] = it + 1
            converged[active[sets].cpu(), which.cpu()] = True
            moving = moving & ~done
            still = moving.any(-1)  # (A,)
            if not still.all():
                active, xa, wa, moving = active[still], xa[still], wa[still], moving[still]
                if active.numel() == 0:
                    break
    return w, n_iter, converged


def _as_moments(data: ArrayLike | SecondMoments, device, dtype: torch.dtype) -> SecondMoments:
    if isinstance(data, SecondMoments):
        return data
    return SecondMoments.of(torch.as_tensor(data).to(device=device, dtype=dtype), dtype)


def _token_side(sample: ArrayLike | SecondMoments) -> bool:
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
    dead = x.amax(0) == x.amin(0)  # exact, like SecondMoments.constant
    mean = x.mean(0, dtype=torch.float64)  # (d,)
    z = x.to(dtype) - mean.to(dtype)  # (T, d) centred, in the working dtype (float16 samples are widened)
    var = torch.linalg.vector_norm(z, dim=0, dtype=torch.float64).square_() / n  # (d,) summed in float64
    inv = torch.where(dead, 0.0, var.clamp(min=torch.finfo(torch.float64).tiny).rsqrt())
    z = z.mul_(inv.to(dtype)).T  # (d, T) z-scored neurons
    z -= z.mean(0, keepdim=True)  # each token centred across neurons
    gram = z.T @ z / n  # (T, T)
    eigval, v = _top_eig(gram, components, eig_method, seed, *_EIG_DEFAULTS.get(eig_method, (0, 0)))  # (k,), (T, k)
    u = _sign_fix(z @ v / (eigval * n).sqrt().clamp(min=torch.finfo(dtype).tiny))  # (d, k) unit columns
    total = gram.diagonal().sum().clamp(min=torch.finfo(dtype).tiny)
    return u * z.shape[0] ** 0.5, eigval / total, int(dead.sum())


def _layer_whitening(
    sample: ArrayLike | SecondMoments, components: int, seed: int, eig_method: str, device, dtype: torch.dtype
) -> tuple[torch.Tensor, int]:
    """Checked spatial-ICA whitening (d, k) of one layer and its dead-neuron count, from its moments or its
    token sample (through the smaller of the two Grams)."""
    check_sample(sample, components)
    if _token_side(sample):
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


def find_networks_torch(
    tokens: ArrayLike | SecondMoments,
    components: int,
    threshold: float,
    seed: int,
    max_iter: int = 400,
    tol: float = 1e-4,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    eig_method: str = "krylov",
    restarts: int = 1,
    runs: int = 1,
) -> LayerNetworks:
    """Drop-in for `fnprune.networks.find_networks` (same inputs, checks and post-processing) on this engine.

    `tokens`: one layer's token activations (T, d), or their `SecondMoments`. The whitening is the top-k
    eigenvectors of the neuron correlation Gram (`eig_method` "krylov", "randomized" or exact "eigh"), the
    reference's subspace; FastICA run r starts from scikit-learn's matrix for seed + r. Maps come back as float64 numpy.
    `runs` > 1 pools the networks of seeds seed, seed + 1, ... on one whitening; `restarts` only measures
    stability.
    """
    whitened, dead = _layer_whitening(tokens, components, seed, eig_method, device, dtype)
    found = []
    for run in range(runs):
        ica = fast_ica(whitened, "logcosh", max_iter, tol, seed + run, restarts)
        found.append(networks_from_sources(ica.sources.T.cpu().numpy(), threshold, ica.converged, dead))
    return pool_networks(found)


def find_networks_batch(
    layers: Iterable[ArrayLike | SecondMoments],
    components: int,
    threshold: float,
    seed: int,
    max_iter: int = 400,
    tol: float = 1e-4,
    runs: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    eig_method: str = "krylov",
    progress=None,
    max_batch_elements: int = 2**23,
    workers: int | None = None,
    whitening_bytes: int = 2**31,
) -> list[LayerNetworks]:
    """`find_networks_torch` for many layers at once: every layer's FastICA runs go through the fixed-point
    loop as one batch (layers of equal width together, at most `max_batch_elements` values of the runs'
    projections in all workers' batches together), which on the CPU is several times faster than layer after
    layer. Same networks as the per-layer call.

    On the CPU the layers are shared among `workers` threads (default: torch's thread count), each running its
    layers on one torch thread: the loop's many small LAPACK calls (a 32 x 32 eigh per run and iteration) do not
    parallelise inside one call, so two single-threaded workers beat one two-threaded loop by about 1.5x. A
    layer's result does not depend on which worker or batch it ran in (checked in the tests). Whitening needs
    d x d matrices (about 12 d^2 bytes from moments, 20 d^2 from tokens): workers whiten side by side only while
    their estimates sum to at most `whitening_bytes`, so wide MLPs on many cores whiten one layer at a time.

    `layers` may be a generator: each layer's tokens or moments are only needed for its whitening, so at most
    one per worker is alive at a time. `progress`: optional tqdm-like bar, advanced once per batched iteration.
    Raises ValueError naming the layer whose activations cannot be unmixed.
    """
    workers = _worker_count(device, workers)

    budget = _ByteBudget(whitening_bytes)

    def whiten_layer(i: int, layer: ArrayLike | SecondMoments) -> tuple[torch.Tensor, int]:
        try:
            with budget.hold(_whitening_bytes(layer)):
                return _layer_whitening(layer, components, seed, eig_method, device, dtype)
        except ValueError as exc:
            raise ValueError(f"layer {i}: {exc}") from exc

    starts = torch.stack([sklearn_init(seed + r, components)[0] for r in range(runs)]).to(device, dtype)
    tick = _locked(progress.update) if progress is not None else None

    def unmix(chunk: list[int]) -> list[LayerNetworks]:
        """FastICA for one batch of equal-width layers, then each layer's pooled networks."""
        x = torch.stack([whitened[i][0].T for i in chunk])  # (L, k, d)
        w0 = starts.expand(len(chunk), -1, -1, -1)  # (L, runs, k, k)
        w, n_iter, converged = _ica_par(x, w0, "logcosh", max_iter, tol, on_iter=tick)
        if tick is not None:
            tick(max_iter - int(n_iter.max()))
        s = (w.flatten(1, 2) @ x).unflatten(1, (runs, components)).cpu().numpy()  # (L, runs, k, d)
        return [
            pool_networks([networks_from_sources(s[j, r], threshold, bool(converged[j, r]), whitened[i][1])
                           for r in range(runs)])
            for j, i in enumerate(chunk)
        ]

    with _one_thread(device):  # every kernel on one thread: results independent of `workers`
        whitened = _map_in_threads(whiten_layer, layers, workers)
        # Equal widths batch together; each worker takes every `workers`-th layer of a width, so the slow layers
        # (FastICA runs to max_iter in some layers, converges in tens of iterations in others) spread out.
        chunks: list[list[int]] = []
        for width in sorted({w.shape[0] for w, _ in whitened}):
            same = [i for i, (w, _) in enumerate(whitened) if w.shape[0] == width]
            per_chunk = max(1, max_batch_elements // (workers * runs * components * width))  # all workers
            for part in (same[j::workers] for j in range(workers)):
                chunks += [part[j : j + per_chunk] for j in range(0, len(part), per_chunk)]
        if progress is not None:
            progress.reset(total=len(chunks) * max_iter)
        found = _map_in_threads(lambda _, chunk: unmix(chunk), chunks, workers)
    by_layer = {i: nets for chunk, nets_of in zip(chunks, found) for i, nets in zip(chunk, nets_of)}
    return [by_layer[i] for i in range(len(whitened))]


def _worker_count(device: str | torch.device, workers: int | None) -> int:
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if torch.device(device).type != "cpu":
        return 1  # one device: its kernels are already parallel
    return workers if workers is not None else max(1, torch.get_num_threads())


def _whitening_bytes(layer: ArrayLike | SecondMoments) -> int:
    """Rough peak working memory of one layer's whitening: from moments, the d x d float64 covariance and
    float32 Gram; from T < d tokens (`_token_side`), a working copy of them in the whitening dtype with room
    for its reductions' temporaries, and the T x T Gram; from more tokens than neurons, their float64 copy and
    moments, and the neuron Gram."""
    if isinstance(layer, SecondMoments):
        return 12 * layer.width**2
    rows, width = layer.shape
    if _token_side(layer):
        return 12 * rows * width + 8 * rows**2
    return 20 * width**2 + 8 * rows * width


class _ByteBudget:
    """Threads hold at most `limit` bytes of estimated working memory at once; a request larger than the limit
    waits until it can run alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self._changed:
            while self.used and self.used + nbytes > self.limit:
                self._changed.wait()
            self.used += nbytes
        try:
            yield
        finally:
            with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


def _locked(fn: Callable[[int], object]) -> Callable[[int], None]:
    lock = threading.Lock()

    def call(n: int = 1) -> None:
        with lock:
            fn(n)

    return call


def _map_in_threads(fn: Callable[[int, _T], _R], items: Iterable[_T], workers: int) -> list[_R]:
    """[fn(i, item) for i, item in enumerate(items)] on `workers` threads, in order.

    Items are pulled one at a time (a generator is never run ahead, nor from two threads at once). After a
    failure no new item starts, and the failure of the lowest item index is raised, as a loop would.
    """
    source = enumerate(items)
    if workers == 1:
        return [fn(i, item) for i, item in source]
    lock, results, errors = threading.Lock(), {}, {}

    def work() -> None:
        while True:
            with lock:
                if errors:
                    return
                try:
                    i, item = next(source)
                except StopIteration:
                    return
            try:
                results[i] = fn(i, item)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                with lock:
                    errors[i] = exc
                return

    threads = [threading.Thread(target=work, name=f"fnprune-ica-{n}", daemon=True) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[min(errors)]
    return [results[i] for i in range(len(results))]
