"""How sure a "% of dense" is: a paired bootstrap over the evaluation examples.

The dense and the pruned model answer the same examples under the same templates, so one resample of the examples
serves both, and the interval is that of the ratio of their mean accuracies. Near-chance templates and a few
hundred examples make it wide; the headline number alone hides that.
"""

from __future__ import annotations

import torch

__all__ = ["RESAMPLES", "retained_interval"]

RESAMPLES = 2000
_CHUNK = 200  # resamples gathered at once: bounded memory on large evaluation splits


def retained_interval(dense: torch.Tensor, pruned: torch.Tensor, level: float = 0.95, resamples: int = RESAMPLES,
                      seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of pruned / dense mean accuracy. `dense`, `pruned`: (templates, examples) with 1 where
    the model answered right; the mean is over templates and examples. None when the dense model is never right,
    or the shapes disagree."""
    if dense.shape != pruned.shape or dense.ndim != 2 or dense.numel() == 0 or not 0 < level < 1:
        return None
    n = dense.shape[1]
    d, p = dense.double().mean(0), pruned.double().mean(0)  # per example: the share of templates answered right
    generator = torch.Generator().manual_seed(seed)
    ratios = []
    for start in range(0, resamples, _CHUNK):
        idx = torch.randint(n, (min(_CHUNK, resamples - start), n), generator=generator)
        dense_mean, pruned_mean = d[idx].mean(1), p[idx].mean(1)
        ratios.append((pruned_mean / dense_mean)[dense_mean > 0])
    found = torch.cat(ratios)
    if found.numel() < resamples / 2:  # the dense model is right on too few examples for a ratio
        return None
    tail = (1 - level) / 2
    low, high = torch.quantile(found, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high
