"""FastICA, one per engine (pure math): the torch engine's own, and scikit-learn's for the reference engine.

The torch FastICA is scikit-learn's parallel FastICA (`_ica_par`) in torch: the same fixed point and
conventions, started from scikit-learn's own random matrix for a seed (`sklearn_init`), so for the same
whitening and seed the two engines run the same iterations up to rounding. Several restarts, runs and layers go
through the fixed-point loop as one batch; the restarts' agreement measures how reproducible the components are.

Shapes follow scikit-learn: data are (n_samples, n_features). In fnprune's spatial ICA the samples are neurons
and the features are tokens (fnprune.networks.whitening).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .threads import one_thread

__all__ = ["IcaResult", "fast_ica", "ica_par", "match_components", "sklearn_fast_ica", "sklearn_init"]

ArrayLike = torch.Tensor | np.ndarray


@dataclass
class IcaResult:
    sources: torch.Tensor  # (n_samples, k) independent components of the first run
    unmixing: torch.Tensor  # (k, k) W of the first run: sources = whitened @ W.T
    n_iter: int  # iterations of the first run
    converged: bool  # the first run reached tol before max_iter
    stability: float | None = None  # restarts > 1: mean matched |corr| of the other runs' components with run 0's
    component_stability: torch.Tensor | None = None  # (k,) the same per component of run 0


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
    with one_thread(x.device, small=restarts * k * k * x.shape[1] < 50_000_000):
        w, n_iter, converged = ica_par(x[None], init[None], fun, max_iter, tol)
        w, n_iter, converged = w[0], n_iter[0], converged[0]
        sources = w @ x  # (R, k, n)
    result = IcaResult(sources[0].T, w[0], int(n_iter[0]), bool(converged[0]))
    if restarts > 1:
        per = np.stack([_matched_abs_corr(sources[0], sources[r])[0] for r in range(1, restarts)])  # (R-1, k)
        result.stability = float(per.mean())
        result.component_stability = torch.from_numpy(per.mean(0))
    return result


def ica_par(
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



def sklearn_fast_ica(whitened: np.ndarray, seed: int, max_iter: int, tol: float) -> tuple[np.ndarray, bool]:
    """The reference engine's FastICA: scikit-learn's logcosh FastICA of whitened data (n_samples, k) from its
    start for `seed`. Returns the sources (k, n_samples) and whether it reached `tol` before `max_iter`."""
    from sklearn.decomposition import FastICA  # imported here: scikit-learn + SciPy cost ~150 MiB of RSS
    from sklearn.exceptions import ConvergenceWarning

    ica = FastICA(
        n_components=whitened.shape[1], whiten=False, fun="logcosh", max_iter=max_iter, tol=tol, random_state=seed
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        sources = ica.fit_transform(whitened)  # (n_samples, k)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return sources.T, converged
