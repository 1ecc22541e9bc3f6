"""ICA engine in torch (pure math: CPU or CUDA, float32 or float64; knows nothing of models or files).

The same algorithm and conventions as scikit-learn's parallel FastICA (`_ica_par`), which stays the reference in
the tests, without its costs on our shapes:
- whitening needs only the top k principal directions, so it comes from a Gram/covariance matrix (which can be
  accumulated batch by batch, `StreamedCorrelation`) or a seeded randomized range finder, never a full SVD;
- several restarts run as one batch, and their agreement measures how reproducible the components are;
- LAPACK calls (eigh, qr, svd) and the fixed-point loop run on one CPU thread: they are small, and on a shared
  machine torch's threaded LAPACK was measured 10-300x slower than single-threaded (threads spin while waiting).

Shapes follow scikit-learn: data are (n_samples, n_features). In fnprune's spatial ICA the samples are neurons
and the features are tokens (see fnprune.networks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .networks import LayerNetworks, pool_networks

__all__ = [
    "IcaResult",
    "StreamedCorrelation",
    "Whitening",
    "fast_ica",
    "find_networks_torch",
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


def _top_eig(
    sym: torch.Tensor, k: int, method: str, seed: int, oversample: int, power_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest k eigenvalues (k,) and eigenvectors (m, k) of a symmetric PSD matrix (m, m), largest first.

    "eigh" is exact; "randomized" is seeded subspace iteration (Halko et al. 2011, alg. 4.4 on the Gram) with a
    Rayleigh-Ritz step: O(m^2 (k + oversample)) per iteration instead of eigh's poorly parallel O(m^3).
    """
    with _one_thread(sym.device):
        if method == "eigh":
            eigval, eigvec = torch.linalg.eigh(sym)  # ascending
        elif method == "randomized":
            q = torch.linalg.qr(sym @ _gaussian(sym.shape[0], min(k + oversample, sym.shape[0]), seed, sym)).Q
            for _ in range(power_iters):
                q = torch.linalg.qr(sym @ q).Q  # (m, l)
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
    which is why the Gram can come from a stream (`StreamedCorrelation`) instead of a stored sample.
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


class StreamedCorrelation:
    """Neuron correlation accumulated batch by batch: spatial-ICA whitening over all tokens, no token sample.

    fnprune's spatial ICA z-scores each neuron over tokens, then centres each token across neurons; the Gram of
    that (d, T) matrix is T * P R P (R = neuron correlation, P = I - 11^T/d), and `whiten_gram` needs nothing
    else. Memory: one d x d matrix. Sums are taken around the first batch's mean (no cancellation in float32).
    """

    def __init__(self, width: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64):
        self.outer = torch.zeros(width, width, dtype=dtype, device=device)
        self.sum = torch.zeros(width, dtype=dtype, device=device)
        self.shift: torch.Tensor | None = None
        self.low = torch.full((width,), float("inf"), dtype=dtype, device=device)
        self.high = torch.full((width,), -float("inf"), dtype=dtype, device=device)
        self.count = 0

    def update(self, tokens: ArrayLike) -> None:
        """Add a batch of token activations (B, d)."""
        t = torch.as_tensor(tokens).to(self.outer.device, self.outer.dtype)
        if self.shift is None:
            self.shift = t.mean(0)
        self.low = torch.minimum(self.low, t.amin(0))
        self.high = torch.maximum(self.high, t.amax(0))
        t = t - self.shift  # (B, d)
        self.sum += t.sum(0)
        # Upper block triangle only: 3 of the 4 (d/2 x d/2) products, 25% less time than t^T t.
        h = self.outer.shape[0] // 2
        a, b = t[:, :h], t[:, h:]
        self.outer[:h, :h].addmm_(a.T, a)
        self.outer[:h, h:].addmm_(a.T, b)
        self.outer[h:, h:].addmm_(b.T, b)
        self.count += t.shape[0]

    @property
    def constant(self) -> torch.Tensor:
        """(d,) bool: neurons that never varied (dead); an exact test, so rounding cannot fake a variance."""
        return self.high == self.low

    def centred_gram(self) -> torch.Tensor:
        """(d, d) P R P: Gram of the z-scored, token-centred (d, T) matrix divided by T; dead neurons give 0."""
        if self.count == 0:
            raise ValueError("no tokens were added")
        mean = self.sum / self.count  # (d,) mean minus shift
        h = self.outer.shape[0] // 2
        gram = self.outer / self.count
        gram[h:, :h] = gram[:h, h:].T  # fill the lower block from the upper one
        gram.sub_(torch.outer(mean, mean))  # covariance
        inv = torch.where(~self.constant, gram.diagonal().clamp(min=torch.finfo(gram.dtype).tiny).rsqrt(), 0.0)
        gram.mul_(inv[:, None]).mul_(inv[None, :])  # correlation R
        row = gram.mean(1)  # (d,) = column means too: R is symmetric
        return gram.sub_(row[:, None]).sub_(row[None, :]).add_(row.mean())  # P R P


def _nonlinearity(u: torch.Tensor, fun: str) -> tuple[torch.Tensor, torch.Tensor]:
    """g(u) and the sample mean of g'(u) for u (..., k, n), as scikit-learn's _logcosh / _cube (alpha = 1)."""
    if fun == "logcosh":
        gu = torch.tanh(u)
        return gu, (1 - gu.pow(2)).mean(-1)
    if fun == "cube":
        return u.pow(3), 3 * u.pow(2).mean(-1)
    raise ValueError(f"unknown FastICA nonlinearity {fun!r}; use 'logcosh' or 'cube'")


def _sym_decorrelation(w: torch.Tensor) -> torch.Tensor:
    """W <- (W W^T)^{-1/2} W for a batch of square matrices (..., k, k)."""
    s, u = torch.linalg.eigh(w @ w.mT)
    s = s.clamp(min=torch.finfo(w.dtype).tiny)
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

    W <- sym_decorrelation(E[g(WX) X^T] - E[g'(WX)] W) until max_i |abs(diag(W1 W^T)) - 1| < tol. The random
    starts come from one seeded generator and run as one batch (run 0 is the same whatever `restarts` is).
    Run 0 is returned; the others only measure how reproducible its components are (`stability`, 1 =
    identical). `w_init` (k, k) replaces run 0's start, e.g. with scikit-learn's to compare the iterations.
    """
    x = torch.as_tensor(whitened).T  # (k, n): scikit-learn's X1
    k = x.shape[0]
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    _nonlinearity(x[:1, :1], fun)  # reject an unknown `fun` before any work
    init = _gaussian(restarts * k, k, seed, x).reshape(restarts, k, k)  # (R, k, k)
    if w_init is not None:
        init[0] = torch.as_tensor(w_init).to(x.device, x.dtype)
    # Per-iteration work is O(R k^2 n): small problems stay on one thread (see the module doc).
    with _one_thread(x.device, small=restarts * k * k * x.shape[1] < 50_000_000):
        w, n_iter, converged = _ica_par(x, init, fun, max_iter, tol)
        sources = w @ x  # (R, k, n)
    result = IcaResult(sources[0].T, w[0], int(n_iter[0]), bool(converged[0]))
    if restarts > 1:
        per = np.stack([_matched_abs_corr(sources[0], sources[r])[0] for r in range(1, restarts)])  # (R-1, k)
        result.stability = float(per.mean())
        result.component_stability = torch.from_numpy(per.mean(0))
    return result


def _ica_par(
    x: torch.Tensor, init: torch.Tensor, fun: str, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed-point loop on X (k, n) from R starts (R, k, k) at once; a run that converged stops moving."""
    restarts, n = init.shape[0], x.shape[1]
    w = _sym_decorrelation(init)  # (R, k, k)
    active = torch.ones(restarts, dtype=torch.bool, device=x.device)
    n_iter = torch.full((restarts,), max_iter, dtype=torch.long)
    for it in range(max_iter):
        gu, gpu = _nonlinearity(w @ x, fun)  # (R, k, n), (R, k)
        w1 = _sym_decorrelation(gu @ x.T / n - gpu[..., None] * w)
        lim = ((w1 * w).sum(-1).abs() - 1).abs().amax(-1)  # (R,)
        w = w1 if restarts == 1 else torch.where(active[:, None, None], w1, w)
        done = (lim < tol) & active
        if done.any():
            n_iter[done.cpu()] = it + 1
            active &= ~done
            if not active.any():
                break
    return w, n_iter, (~active).cpu()


def _zscore_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows to zero mean and unit (population) std; constant rows to 0, as fnprune.networks._zscore."""
    std = x.std(dim=1, correction=0, keepdim=True)
    return torch.where(std > 0, (x - x.mean(dim=1, keepdim=True)) / torch.where(std > 0, std, 1), 0.0)


def find_networks_torch(
    tokens: ArrayLike,
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

    `tokens` (T, d): one layer's token activations. The whitening is the top-k eigenvectors of the neuron
    correlation Gram (`StreamedCorrelation` over the given tokens; `eig_method` "randomized" or exact "eigh"),
    the same subspace as the reference's. Maps come back as float64 numpy like the reference's.
    `runs` > 1 repeats FastICA from seeds seed, seed + 1, ... on the same whitening and pools the networks
    (fnprune.networks.pool_networks); `restarts` only measures stability.
    """
    t = torch.as_tensor(tokens).to(device=device, dtype=dtype)
    n_tokens, width = t.shape
    if components >= min(n_tokens, width):
        raise ValueError(
            f"components ({components}) must be smaller than both the number of tokens ({n_tokens}) "
            f"and of neurons ({width})"
        )
    stream = StreamedCorrelation(width, t.device, dtype)
    stream.update(t)
    if not (torch.isfinite(stream.low).all() and torch.isfinite(stream.high).all()):  # min/max carry NaN and inf
        raise ValueError("activations contain NaN or inf")
    whitened, explained = whiten_gram(stream.centred_gram(), components, eig_method, seed)  # (d, k), (k,)
    floor = 1e-10 if dtype == torch.float64 else 1e-5  # eigenvalue noise of a rank-deficient Gram, relative
    if explained[-1] <= floor * max(float(explained[0]), 1e-300):
        raise ValueError(f"activations have rank below {components} components; lower `components`")
    found = []
    for run in range(runs):
        ica = fast_ica(whitened, "logcosh", max_iter, tol, seed + run, restarts)
        maps = _zscore_rows(ica.sources.T.to(torch.float64))  # (k, d)
        skew = maps.pow(3).mean(dim=1)
        maps = (maps * torch.where(skew < 0, -1.0, 1.0)[:, None]).cpu().numpy()
        found.append(LayerNetworks(maps, np.abs(maps) > threshold, threshold, ica.converged,
                                   int(stream.constant.sum())))
    return pool_networks(found)
