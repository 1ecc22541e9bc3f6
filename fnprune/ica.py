"""ICA engine in torch (pure math: CPU or CUDA, float32 or float64; knows nothing of models or files).

The same algorithm and conventions as scikit-learn's parallel FastICA (`_ica_par`), which stays the reference in
the tests, without its costs on our shapes:
- whitening needs only the top k principal directions, so it comes from a Gram/covariance matrix (which can be
  accumulated batch by batch, fnprune.moments) or a seeded randomized range finder, never a full SVD;
- FastICA starts from scikit-learn's own random matrix for a seed (`sklearn_init`), so for the same whitening
  and seed the two engines run the same iterations up to rounding;
- several restarts, several runs and several layers go through the fixed-point loop as one batch
  (`find_networks_batch`); the restarts' agreement measures how reproducible the components are;
- small LAPACK calls (eigh, Cholesky, QR) run on one CPU thread: on a shared machine torch's threaded LAPACK was
  measured 10-300x slower than single-threaded (threads spin while waiting); big products use every thread.

Shapes follow scikit-learn: data are (n_samples, n_features). In fnprune's spatial ICA the samples are neurons
and the features are tokens (see fnprune.networks).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .moments import SecondMoments
from .networks import LayerNetworks, check_sample, networks_from_sources, pool_networks

__all__ = [
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
def _one_thread(device: torch.device, small: bool = True) -> Iterator[None]:
    """Run the block on one CPU thread (torch's thread count is process-wide; restored on exit)."""
    if device.type != "cpu" or not small:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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

    "eigh" is exact; "randomized" is seeded subspace iteration (Halko et al. 2011, alg. 4.4 on the Gram) with a
    Rayleigh-Ritz step: O(m^2 (k + oversample)) per iteration instead of eigh's poorly parallel O(m^3). Its
    products use all threads; the small factorisations run on one (see the module doc).
    """
    if method == "eigh":
        with _one_thread(sym.device):
            eigval, eigvec = torch.linalg.eigh(sym)  # ascending
    elif method == "randomized":
        q = _orthonormal(sym @ _gaussian(sym.shape[0], min(k + oversample, sym.shape[0]), seed, sym))
        for _ in range(power_iters):
            q = _orthonormal(sym @ q)  # (m, l)
        with _one_thread(sym.device):
            eigval, small = torch.linalg.eigh(q.T @ sym @ q)  # (l,), (l, l) ascending
        eigvec = q @ small  # (m, l)
    else:
        raise ValueError(f"unknown eigen method {method!r}; use 'eigh' or 'randomized'")
    return eigval.flip(0)[:k].clamp(min=0), _sign_fix(eigvec.flip(1)[:, :k])


def whiten_gram(
    gram: torch.Tensor, k: int, method: str = "randomized", seed: int = 0, oversample: int = 32, power_iters: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened data (n, k) and explained-variance fractions (k,) from the n x n Gram of column-centred data.

    The whitened data are the top-k eigenvectors scaled to unit variance: nothing else of the data is needed,
    which is why the Gram can come from a stream (fnprune.moments) instead of a stored sample.
    """
    if not 0 < k <= gram.shape[0]:
        raise ValueError(f"k ({k}) must be in 1..{gram.shape[0]}")
    eigval, eigvec = _top_eig(gram, k, method, seed, oversample, power_iters)
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
        w1 = _sym_decorrelation(step - gpu.unflatten(1, (runs, k))[..., None] * wa)
        done = (((w1 * wa).sum(-1).abs() - 1).abs().amax(-1) < tol) & moving  # (A, R) newly converged
        wa = torch.where(moving[..., None, None], w1, wa)
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


def _layer_whitening(
    moments: SecondMoments, components: int, seed: int, eig_method: str, device, dtype: torch.dtype
) -> torch.Tensor:
    """Checked spatial-ICA whitening (d, k) of one layer from its moments."""
    check_sample(moments, components)
    gram = moments.correlation_gram(dtype).to(device)
    whitened, explained = whiten_gram(gram, components, eig_method, seed)  # (d, k), (k,)
    exact = moments.dtype == dtype == torch.float64
    floor = 1e-10 if exact else 1e-5  # relative eigenvalue noise of a rank-deficient Gram
    if explained[-1] <= floor * max(float(explained[0]), 1e-300):
        raise ValueError(f"activations have rank below {components} components; lower `components`")
    return whitened.to(dtype)


def find_networks_torch(
    tokens: ArrayLike | SecondMoments,
    components: int,
    threshold: float,
    seed: int,
    max_iter: int = 400,
    tol: float = 1e-4,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    eig_method: str = "randomized",
    restarts: int = 1,
    runs: int = 1,
) -> LayerNetworks:
    """Drop-in for `fnprune.networks.find_networks` (same inputs, checks and post-processing) on this engine.

    `tokens`: one layer's token activations (T, d), or their `SecondMoments`. The whitening is the top-k
    eigenvectors of the neuron correlation Gram (`eig_method` "randomized" or exact "eigh"), the reference's
    subspace; FastICA run r starts from scikit-learn's matrix for seed + r. Maps come back as float64 numpy.
    `runs` > 1 pools the networks of seeds seed, seed + 1, ... on one whitening; `restarts` only measures
    stability.
    """
    moments = _as_moments(tokens, device, dtype)
    whitened = _layer_whitening(moments, components, seed, eig_method, device, dtype)
    dead = int(moments.constant.sum())
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
    eig_method: str = "randomized",
    progress=None,
    max_batch_elements: int = 2**23,
) -> list[LayerNetworks]:
    """`find_networks_torch` for many layers at once: every layer's FastICA runs go through the fixed-point
    loop as one batch (layers of equal width together, at most `max_batch_elements` data values per batch),
    which on the CPU is several times faster than layer after layer. Same networks as the per-layer call.

    `layers` may be a generator: each layer's tokens or moments are only needed for its whitening, so at most
    one is alive at a time. `progress`: optional tqdm-like bar, advanced once per batched iteration.
    Raises ValueError naming the layer whose activations cannot be unmixed.
    """
    whitened, dead = [], []
    for i, layer in enumerate(layers):
        try:
            moments = _as_moments(layer, device, torch.float64)
            whitened.append(_layer_whitening(moments, components, seed, eig_method, device, dtype))
        except ValueError as exc:
            raise ValueError(f"layer {i}: {exc}") from exc
        dead.append(int(moments.constant.sum()))
        del moments
    starts = torch.stack([sklearn_init(seed + r, components)[0] for r in range(runs)]).to(device, dtype)
    chunks: list[list[int]] = []
    for width in sorted({w.shape[0] for w in whitened}):
        same = [i for i, w in enumerate(whitened) if w.shape[0] == width]
        per_chunk = max(1, max_batch_elements // (runs * components * width))
        chunks += [same[j : j + per_chunk] for j in range(0, len(same), per_chunk)]
    if progress is not None:
        progress.reset(total=len(chunks) * max_iter)
    sources: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for chunk in chunks:
        x = torch.stack([whitened[i].T for i in chunk])  # (L, k, d)
        w0 = starts.expand(len(chunk), -1, -1, -1)  # (L, runs, k, k)
        w, n_iter, converged = _ica_par(x, w0, "logcosh", max_iter, tol,
                                        on_iter=progress.update if progress is not None else None)
        if progress is not None:
            progress.update(max_iter - int(n_iter.max()))
        s = (w.flatten(1, 2) @ x).unflatten(1, (runs, components))  # (L, runs, k, d)
        for j, i in enumerate(chunk):
            sources[i] = (s[j], converged[j])
    return [
        pool_networks([networks_from_sources(sources[i][0][r].cpu().numpy(), threshold, bool(sources[i][1][r]), dead[i])
                       for r in range(runs)])
        for i in range(len(whitened))
    ]
