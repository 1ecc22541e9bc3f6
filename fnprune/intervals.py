"""How sure a "% of dense" is: a paired bootstrap over the evaluation examples.

The dense and the pruned model answer the same examples under the same templates, so one resample of the examples
serves both, and the interval is that of the ratio of their mean accuracies. Near-chance templates and a few
hundred examples make it wide; the headline number alone hides that.
"""

from __future__ import annotations

import torch

__all__ = ["RESAMPLES", "retained_interval", "difference_interval", "draws_difference_interval"]

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


def draws_difference_interval(first: torch.Tensor, draws: torch.Tensor, level: float = 0.95,
                              resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of the draws' mean accuracy minus `first`'s, in accuracy points, resampling the examples
    (paired) and, independently, the draws (with replacement): random controls (fnprune analyze: random neurons
    masked vs a network masked) vary from draw to draw, and with the draws held fixed one lucky draw could decide
    the interval's sign. `first`: (examples,) with 1 where right; `draws`: (draws, examples)."""
    if draws.ndim != 2 or first.shape != draws.shape[1:] or not first.numel() or not 0 < level < 1:
        return None
    first, draws = first.double(), draws.double()
    k, n = draws.shape
    generator = torch.Generator().manual_seed(seed)
    values = []
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        idx = torch.randint(n, (size, n), generator=generator)
        per_example = draws[torch.randint(k, (size, k), generator=generator)].mean(1)  # (size, n)
        values.append(per_example.gather(1, idx).mean(1) - first[idx].mean(1))
    return _percentiles(torch.cat(values), level)


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
    return _percentiles(found, level)


def _percentiles(values: torch.Tensor, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high
