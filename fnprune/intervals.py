"""How sure a "% of dense" is: a paired bootstrap over the evaluation examples.

The dense and the pruned model answer the same examples under the same templates, so one resample of the examples
serves both, and the interval is that of the ratio of their mean accuracies. Near-chance templates and a few
hundred examples make it wide; the headline number alone hides that.
"""

from __future__ import annotations

import torch

__all__ = ["RESAMPLES", "retained_interval", "difference_interval", "mean_difference_interval"]

RESAMPLES = 2000
_CHUNK = 200  # resamples gathered at once: bounded memory on large evaluation splits


def retained_interval(dense: torch.Tensor, pruned: torch.Tensor, level: float = 0.95, resamples: int = RESAMPLES,
                      seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of pruned / dense mean accuracy. `dense`, `pruned`: (templates, examples) with 1 where
    the model answered right; the mean is over templates and examples. None when the dense model is never right,
    or the shapes disagree."""
    return _interval([dense, pruned], lambda d, p: p / d, level, resamples, seed)


def difference_interval(dense: torch.Tensor, first: torch.Tensor, second: torch.Tensor, level: float = 0.95,
                        resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of (second - first) / dense mean accuracy: how far apart two pruned models of the same
    dense one are, in shares of dense, with all three resampled together (much narrower than the two models'
    own intervals when they answer most examples alike). Shapes as in `retained_interval`."""
    return _interval([dense, first, second], lambda d, a, b: (b - a) / d, level, resamples, seed)


def mean_difference_interval(first: torch.Tensor, second: torch.Tensor, level: float = 0.95,
                             resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of second - first mean accuracy in accuracy points (not shares of a dense model): how
    much more often one intervention is right than another on the same examples (fnprune analyze: random neurons
    masked vs a network masked). Shapes as in `retained_interval`; rows may be fractions (a mean over seeds)."""
    return _interval([first, second], lambda a, b: b - a, level, resamples, seed)


def _interval(hits: list[torch.Tensor], statistic, level: float, resamples: int, seed: int
              ) -> tuple[float, float] | None:
    """The statistic of the models' mean accuracies over paired resamples of the examples; a resample where it
    is undefined (a ratio to a dense accuracy of 0) is left out."""
    dense = hits[0]
    if (any(h.shape != dense.shape for h in hits) or dense.ndim != 2 or dense.numel() == 0
            or not 0 < level < 1):
        return None
    n = dense.shape[1]
    per_example = [h.double().mean(0) for h in hits]  # the share of templates answered right
    generator = torch.Generator().manual_seed(seed)
    values = []
    for start in range(0, resamples, _CHUNK):
        idx = torch.randint(n, (min(_CHUNK, resamples - start), n), generator=generator)
        means = [e[idx].mean(1) for e in per_example]
        value = statistic(*means)
        values.append(value[value.isfinite()])  # x / 0: inf or NaN
    found = torch.cat(values)
    if found.numel() < resamples / 2:  # the dense model is right on too few examples for a ratio
        return None
    tail = (1 - level) / 2
    low, high = torch.quantile(found, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high
