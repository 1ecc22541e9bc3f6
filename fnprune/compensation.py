"""Least-squares reconstruction of removed MLP neurons from the kept ones (pure math; knows nothing of models).

Removing neurons D from an MLP drops W_D a_D from its output. Bias compensation (FLAP) replaces a_D by its
calibration mean. Reconstruction goes one step further: a_D is predicted from the kept neurons,

    a_D ~ c_D + (a_K - c_K) @ M,    M = argmin E||a_D - c_D - (a_K - c_K) M||^2 + ridge term,

which is a ridge regression over the calibration tokens (c = mean for a centred fit with an intercept, c = 0
where the architecture has no bias to hold the intercept). Because the fill is linear in a_K, it folds into
the kept output weights exactly: W'_K = W_K + M W_D and bias += (c_D - c_K M) W_D. The output
projection weights do not enter the fit: the least-squares M minimises the output error in every direction
at once.
"""

from __future__ import annotations

import torch

from .moments import SecondMoments

__all__ = ["reconstruction_map", "removed_indices", "fold_into_output", "fit_kept_gram", "fit_token_gram",
           "refit_linear"]


def removed_indices(keep: torch.Tensor, width: int) -> torch.Tensor:
    """Sorted indices in [0, width) that are not in `keep`."""
    removed = torch.ones(width, dtype=torch.bool)
    removed[keep] = False
    return removed.nonzero().flatten()


def reconstruction_map(
    sample: torch.Tensor | SecondMoments, keep: torch.Tensor, centre: torch.Tensor | None, ridge: float,
    emphasis: torch.Tensor | None = None, emphasis_weight: float = 0.0,
) -> torch.Tensor:
    """M (n_kept, n_removed), rows and columns in sorted neuron order, fitted on a token sample: the token
    activations (T, d) or their `SecondMoments` (the fit needs nothing else).

    `centre` (d,): the values the fit is taken around (the mean over all calibration tokens), or None for a
    fit through zero. `ridge` is relative to the mean variance of the kept neurons (those not zero on every
    token around `centre`): ridge = 0.1 adds a tenth of their mean energy to the diagonal. A mean, not a typical
    neuron's: in a layer that keeps a massive-activation neuron (as some of SmolLM2's do) that one neuron
    sets it, and the fit there is shrunk far more than elsewhere.

    `emphasis` (N, d): tokens whose error counts `emphasis_weight` of the fit's objective and the sample's the
    rest (e.g. the prompts' last tokens, where the answer is read).
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    if emphasis is not None and emphasis_weight > 0:
        around = torch.zeros(emphasis.shape[1], dtype=torch.float64) if centre is None else centre.double()
        if isinstance(sample, SecondMoments):
            rows = sample.covariance_rows(keep, around)
        else:
            x = sample.double() - around
            rows = x[:, keep].T @ x / max(x.shape[0], 1)
        e = emphasis.double() - around
        rows = (1 - emphasis_weight) * rows + emphasis_weight * (e[:, keep].T @ e) / max(e.shape[0], 1)
        return _solve_kept_rows(rows, keep, ridge)
    if isinstance(sample, SecondMoments):
        around = torch.zeros(sample.width, dtype=torch.float64) if centre is None else centre
        return _solve_kept_rows(sample.covariance_rows(keep, around), keep, ridge)  # rows of E[(a-c)(a-c)^T]
    x = sample.to(torch.float32)
    if centre is not None:
        x = x - centre.to(torch.float32)
    return (fit_token_gram if x.shape[0] < len(keep) else fit_kept_gram)(x, keep, ridge)


def fit_kept_gram(x: torch.Tensor, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ridge fit from a centred token sample (T, d) and sorted `keep`, through the k x k kept-neuron Gram:
    only the kept rows of the second moment (k, d), never the whole d x d."""
    return _solve_kept_rows((x[:, keep].T @ x).to(torch.float64) / max(x.shape[0], 1), keep, ridge)


def fit_token_gram(x: torch.Tensor, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """The same fit through the T x T token Gram, for fewer tokens than kept neurons (wide MLPs):
    (A^T A + mu I)^-1 A^T B = A^T (A A^T + mu I)^-1 B, with A and B the kept and removed neurons' tokens over
    sqrt(T). Faster and closer to a float64 fit than `fit_kept_gram` there (RESULTS 5.1)."""
    n = max(x.shape[0], 1)
    a, b = x[:, keep], x[:, removed_indices(keep, x.shape[1])]  # (T, k), (T, r)
    varied = int((a != 0).any(0).sum())  # as _add_relative_ridge: inputs zero on every token stay out of the mean
    scale = torch.linalg.vector_norm(a, dtype=torch.float64).square() / (n * max(varied, 1))  # mean kept var
    gram = (a @ a.T).to(torch.float64) / n  # (T, T)
    gram.diagonal().add_(max(ridge, 1e-8) * scale)
    y = _solve_positive_definite(gram, b.to(torch.float64) / n)  # (T, r)
    return a.T @ y.to(torch.float32)  # (k, r)


def _solve_kept_rows(cross: torch.Tensor, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """M from the kept rows (k, d) float64 of the centred second moment: kk M = kr, kk with the ridge added."""
    removed = removed_indices(keep, cross.shape[1])
    kk, kr = cross[:, keep], cross[:, removed]
    _add_relative_ridge(kk, ridge)
    return _solve_positive_definite(kk, kr).to(torch.float32)


def _add_relative_ridge(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """Add `ridge` times the mean of `gram`'s non-zero diagonal to that diagonal, in place; returns what was
    added. Inputs zero on every token (a padded layout's padding; centred, any input that never varies) stay out
    of the mean, so they do not dilute the ridge the others get."""
    diagonal = gram.diagonal()
    varied = diagonal[diagonal > 0]
    mean = varied.mean() if varied.numel() else diagonal.new_zeros(())
    scale = max(ridge, 1e-8) * mean.clamp(min=torch.finfo(torch.float64).tiny)
    gram.diagonal().add_(scale)
    return scale


def _solve_positive_definite(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """gram^-1 rhs for a covariance plus a ridge: Cholesky (half LU's work), LU where rounding broke it."""
    chol, info = torch.linalg.cholesky_ex(gram)
    return torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.solve(gram, rhs)


def fold_into_output(
    w_by_neuron: torch.Tensor, keep: torch.Tensor, fill_map: torch.Tensor, centre: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kept output weights with the removed neurons' reconstruction folded in, and the bias to add.

    `w_by_neuron` (d, hidden) is the dense output projection as [neurons, hidden]. Returns W'_K (k, hidden) and
    (c_D - c_K M) W_D (hidden,), or None for a fit through zero.
    """
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    removed = removed_indices(keep, w_by_neuron.shape[0])
    w = w_by_neuron.to(torch.float64)
    m = fill_map.to(torch.float64)
    w_kept = (w[keep] + m @ w[removed]).to(w_by_neuron.dtype)
    if centre is None:
        return w_kept, None
    c = centre.to(torch.float64)
    bias = ((c[removed] - c[keep] @ m) @ w[removed]).to(w_by_neuron.dtype)
    return w_kept, bias


def refit_linear(
    x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor | None, ridge: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W (k, out) and b (out,) that map inputs x (T, k) to targets y (T, out) by least squares, with a ridge that
    pulls W toward `w0` (the weights before the refit) instead of toward zero: with few tokens per weight the fit
    stays near a known-good map. Centred (intercept in b) when `b0` is given, else through zero. `ridge` is
    relative to the inputs' mean variance, as in `reconstruction_map`."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    x, y = x.float(), y.float()  # the products over tokens in float32 (the bulk of the work), the solve in float64
    mx = x.mean(0, dtype=torch.float64) if b0 is not None else torch.zeros(x.shape[1], dtype=torch.float64)
    my = y.mean(0, dtype=torch.float64) if b0 is not None else torch.zeros(y.shape[1], dtype=torch.float64)
    xc, n = x - mx.float(), max(x.shape[0], 1)
    gram = (xc.T @ xc).double() / n
    scale = _add_relative_ridge(gram, ridge)
    w = _solve_positive_definite(gram, (xc.T @ (y - my.float())).double() / n + scale * w0.double())
    b = None if b0 is None else (my - mx @ w).float()
    return w.float(), b
