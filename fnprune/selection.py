"""Which neurons to keep: pluggable scoring criteria and a per-layer budget (pure math, no models).

Every criterion maps one layer's evidence to a score per neuron; the highest-scoring neurons are kept.
All criteria see the same budget, so evaluation can compare them fairly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .choices import ALLOCATIONS, METHODS, NETWORK_METHODS
from .errors import NumericalError
from .networks import LayerNetworks

__all__ = [
    "LayerEvidence",
    "CRITERIA",
    "ALLOCATIONS",
    "layer_width",
    "allocate_widths",
    "score_layer",
    "top_neurons",
]


@dataclass
class LayerEvidence:
    """Everything a criterion may use about one layer's d neurons."""

    layer: int
    mean_abs: torch.Tensor  # (d,) mean |activation| over calibration tokens
    var: torch.Tensor  # (d,) activation variance (over tokens, not unbiased)
    out_norm: torch.Tensor  # (d,) L2 norm of the neuron's output-projection column
    in_norm: torch.Tensor  # (d,) L2 norm of the neuron's input-projection rows
    mean: torch.Tensor | None = None  # (d,) mean activation
    out_abs_mean: torch.Tensor | None = None  # (d,) mean |weight| of the neuron's output-projection column
    networks: LayerNetworks | None = None
    relevance: np.ndarray | None = None  # (k,) task relevance of each network


Criterion = Callable[[LayerEvidence, int, float], torch.Tensor]


def _random(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 100_003 + ev.layer)
    return torch.rand(ev.out_norm.numel(), generator=gen, dtype=torch.float64)


def _magnitude(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    return ev.in_norm.double() * ev.out_norm.double()


def _wanda_sp(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    """FLAP's Wanda-SP baseline: Wanda's |weight| x input norm averaged over the output projection's rows, i.e.
    the activation's root mean square times its column's mean |weight| (on the dense model's activations, as every
    criterion here; FLAP's code measures each layer after pruning the ones before it)."""
    if ev.mean is None or ev.out_abs_mean is None:
        raise ValueError("the wanda-sp criterion needs the activations' mean and the columns' mean |weight|")
    rms = (ev.var.double() + ev.mean.double().pow(2)).sqrt()
    return rms * ev.out_abs_mean.double()


def _flap(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    return ev.var.double() * ev.out_norm.double().pow(2)


def _fn(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    """Published rule: a neuron's strongest |z| in any network map (network members first)."""
    if ev.networks is None:
        raise ValueError("the fn criterion needs functional networks")
    return torch.from_numpy(np.abs(ev.networks.maps).max(axis=0))


def _fn_task(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    """FLAP score boosted by membership in task-relevant networks (relevance-weighted, in [0, 1])."""
    if ev.networks is None or ev.relevance is None:
        raise ValueError("the fn-task criterion needs functional networks and their task relevance")
    flap = _flap(ev, seed, boost)
    flap = flap / flap.mean().clamp(min=1e-30)
    membership = torch.from_numpy(ev.relevance @ ev.networks.members.astype(np.float64))  # (d,)
    if membership.max() > 0:
        membership = membership / membership.max()
    return flap * (1 + boost * membership)


# The recipe's methods (fnprune.choices.METHODS), in its order; evaluation/ registers experimental ones here too.
CRITERIA: dict[str, Criterion] = dict(zip(METHODS, (_fn_task, _fn, _random, _magnitude, _wanda_sp, _flap), strict=True))
NEEDS_NETWORKS = set(NETWORK_METHODS)


def layer_width(width: int, keep: float, round_to: int) -> int:
    """Neurons kept out of `width`: keep * width rounded to a multiple of round_to, at least one multiple (or,
    when round_to is not below the width, keep * width rounded, at least 1). Halves round to the even multiple
    (Python's round)."""
    if keep >= 1:
        return width
    if round_to >= width:
        return max(1, min(width, round(keep * width)))
    target = round(keep * width / round_to) * round_to
    return int(min(width, max(round_to, target)))


def _median_scale(scores: torch.Tensor) -> torch.Tensor:
    """A layer's median score, or, when over half its neurons score 0 (silent on the calibration data, as ReLU
    layers can be), the median of its non-zero scores: dividing by a clamped 0 would rank every live neuron of
    that layer above every other layer's."""
    median = scores.median()
    if median > 0:
        return median
    live = scores[scores > 0]
    return live.median() if live.numel() else torch.ones((), dtype=scores.dtype)


def allocate_widths(scores: list[torch.Tensor], keep: float, round_to: int, allocation: str = "global") -> list[int]:
    """Per-layer widths from one global ranking: each layer's scores are made comparable (`allocation` "global":
    divided by their mean; "median": by their median, which a few outlier neurons cannot move, so at keep 0.5 every
    layer keeps half; "standardized": shifted and scaled to zero mean and unit standard deviation, as FLAP ranks
    across layers), the top `keep` fraction of all neurons is taken, and each layer's count is rounded as
    `layer_width` rounds it (a multiple of `round_to`, at least one, at most the layer's width; when `round_to` is
    not below the width, the count itself, at least 1)."""
    if allocation == "standardized":
        normalized = [(s.double() - s.double().mean()) / s.double().std().clamp(min=1e-30) for s in scores]
    elif allocation == "median":
        normalized = [s.double() / _median_scale(s.double()) for s in scores]
    elif allocation == "global":
        normalized = [s.double() / s.double().mean().clamp(min=1e-30) for s in scores]
    else:
        known = ", ".join(a for a in ALLOCATIONS if a != "uniform")
        raise ValueError(f"unknown allocation {allocation!r} for one ranking across layers; known: {known}")
    flat = torch.cat(normalized)
    budget = max(1, round(keep * flat.numel()))
    top = torch.sort(flat, descending=True, stable=True).indices[:budget]  # exactly the budget: ties at the cut
    layer_of = torch.repeat_interleave(torch.arange(len(normalized)), torch.tensor([s.numel() for s in normalized]))
    counts = torch.bincount(layer_of[top], minlength=len(normalized)).tolist()  # (dead neurons) cannot add more
    return [layer_width(s.numel(), count / s.numel(), round_to) for s, count in zip(normalized, counts)]


def score_layer(method: str, ev: LayerEvidence, seed: int, boost: float = 1.0) -> torch.Tensor:
    if method not in CRITERIA:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(CRITERIA)}")
    scores = CRITERIA[method](ev, seed, boost)
    if not torch.isfinite(scores).all():
        raise NumericalError(f"layer {ev.layer}: {method} scores contain NaN or inf")
    return scores


def top_neurons(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n highest scores, ascending; ties go to the lower index (deterministic)."""
    order = torch.sort(-scores.double(), stable=True).indices
    return order[:n].sort().values
