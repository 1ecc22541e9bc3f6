"""Experimental task-aware FN criteria, registered into fnprune.selection.CRITERIA at import.

All follow fnprune's criterion signature fn(LayerEvidence, seed, boost) -> score per neuron. Evidence that
LayerEvidence does not carry (relevance to the dense model's label-word logit gap) lives in CONTEXT, which
`prepare` fills per layer before selection.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fnprune.networks import zscore as _zscore
from fnprune.selection import CRITERIA, NEEDS_NETWORKS, LayerEvidence

__all__ = ["CONTEXT", "GAP_CRITERIA", "OBS_CRITERIA", "gap_relevance", "residual_variances"]

CONTEXT: dict[str, Any] = {"gap_relevance": None, "first_cut": 0.3, "decision_var": None, "residual_var": None}


def _unit_mean(x: torch.Tensor) -> torch.Tensor:
    return x / x.mean().clamp(min=1e-30)


def _membership(relevance: np.ndarray, members: np.ndarray) -> torch.Tensor:
    """Relevance-weighted network membership per neuron, scaled to max 1 (as in fnprune's fn-task)."""
    m = torch.from_numpy(relevance @ members.astype(np.float64))
    return m / m.max() if m.max() > 0 else m


def _flap(ev: LayerEvidence) -> torch.Tensor:
    return _unit_mean(ev.var.double() * ev.out_norm.double().pow(2))


def _wanda(ev: LayerEvidence) -> torch.Tensor:
    return _unit_mean(ev.mean_abs.double() * ev.out_norm.double())


def _fn_task_wanda(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    """fn-task with the Wanda-sp score as base instead of FLAP."""
    return _wanda(ev) * (1 + boost * _membership(ev.relevance, ev.networks.members))


def _gap_rel(ev: LayerEvidence) -> np.ndarray:
    rel = CONTEXT["gap_relevance"]
    if rel is None:
        raise ValueError("gap criteria need CONTEXT['gap_relevance'] (call gap_relevance first)")
    return rel[ev.layer]


def _fn_gap(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    """fn-task, but a network's relevance = |corr(its decision-token activity, dense logit gap)|."""
    return _flap(ev) * (1 + boost * _membership(_gap_rel(ev), ev.networks.members))


def _fn_gap_wanda(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    """fn-gap with the Wanda-sp base score."""
    return _wanda(ev) * (1 + boost * _membership(_gap_rel(ev), ev.networks.members))


def _first(ev: LayerEvidence, relevance: np.ndarray) -> torch.Tensor:
    """Members of networks with relevance >= CONTEXT['first_cut'] first (by FLAP), then the rest by FLAP."""
    strong = relevance >= CONTEXT["first_cut"]
    member = torch.from_numpy(ev.networks.members[strong].any(axis=0))
    flap = _flap(ev)
    return flap / (flap.max() + 1e-30) + member.double()


def _fn_first(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    return _first(ev, ev.relevance)


def _fn_gap_first(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    return _first(ev, _gap_rel(ev))


def _dec(ev: LayerEvidence) -> torch.Tensor:
    """FLAP on the decision token only: variance of the last-prompt-token activation x squared out norm."""
    var = CONTEXT["decision_var"]
    if var is None:
        raise ValueError("decision criteria need CONTEXT['decision_var']")
    return _unit_mean(var[ev.layer].double() * ev.out_norm.double().pow(2))


def _flap_dec(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    return _dec(ev)


def _fn_task_dec(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    """fn-task with the decision-token FLAP score as base."""
    return _dec(ev) * (1 + boost * _membership(ev.relevance, ev.networks.members))


def _fn_task_mix(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    """fn-task with base = mean of all-token FLAP and decision-token FLAP (both unit mean)."""
    return (_flap(ev) + _dec(ev)) / 2 * (1 + boost * _membership(ev.relevance, ev.networks.members))


def _residual(ev: LayerEvidence) -> torch.Tensor:
    """Unit-mean structured-OBS saliency: the variance a neuron has that the others cannot predict
    (1 / [Sigma^-1]_ii, ridge-regularized) times its squared output norm: what removing it costs once the
    others have been refitted by least squares (fnprune.compensation)."""
    rv = CONTEXT["residual_var"]
    if rv is None:
        raise ValueError("obs criteria need CONTEXT['residual_var'] (call residual_variances first)")
    return _unit_mean(rv[ev.layer].double() * ev.out_norm.double().pow(2))


def _obs(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    return _residual(ev)


def _fn_task_obs(ev: LayerEvidence, seed: int, boost: float) -> torch.Tensor:
    """fn-task with the structured-OBS saliency as base instead of FLAP."""
    return _residual(ev) * (1 + boost * _membership(ev.relevance, ev.networks.members))


def residual_variances(tokens: list[torch.Tensor], ridge: float) -> list[torch.Tensor]:
    """Per layer, 1 / diag((Sigma + ridge * mean(diag Sigma) I)^-1) of the token activations (T, d)."""
    out = []
    for t in tokens:
        x = t.float() - t.float().mean(0)
        cov = (x.T @ x).double() / len(x)
        cov += ridge * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
        out.append(1 / torch.linalg.inv(cov).diagonal())
    return out


OBS_CRITERIA = {"obs", "fn-task-obs"}
GAP_CRITERIA = {"fn-gap", "fn-gap-wanda", "fn-gap-first"}
for _name, _fn in {
    "fn-task-wanda": _fn_task_wanda,
    "fn-gap": _fn_gap,
    "fn-gap-wanda": _fn_gap_wanda,
    "fn-first": _fn_first,
    "fn-gap-first": _fn_gap_first,
    "flap-dec": _flap_dec,
    "fn-task-dec": _fn_task_dec,
    "fn-task-mix": _fn_task_mix,
}.items():
    CRITERIA.setdefault(_name, _fn)
    NEEDS_NETWORKS.add(_name)
CRITERIA.setdefault("obs", _obs)
CRITERIA.setdefault("fn-task-obs", _fn_task_obs)
NEEDS_NETWORKS.add("fn-task-obs")


def gap_relevance(maps: list[np.ndarray], decision: list[np.ndarray], gap: np.ndarray) -> list[np.ndarray]:
    """Per layer, |Pearson r| between each network's decision-token activity and the dense logit gap."""
    g = (gap - gap.mean()) / (gap.std() + 1e-12)
    out = []
    for m, d in zip(maps, decision):
        act = _zscore(np.asarray(d, dtype=np.float64), axis=0) @ m.T  # (N, k)
        act = (act - act.mean(0)) / np.where(act.std(0) > 0, act.std(0), 1)
        out.append(np.abs(act.T @ g) / len(g))
    return out
