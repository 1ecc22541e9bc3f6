"""Stages 2 and 3, select and reconstruct: which MLP neurons each layer keeps, and the least-squares maps that
rebuild the removed ones from the kept ones (folded into the weights at surgery)."""

from __future__ import annotations

import dataclasses
import logging

import torch
from tqdm.auto import tqdm

from .arch import MLPLayout, adds_to_residual, layout_for, neuron_weight_norms
from .calibration import Calibration
from .capture import LayerActivations
from .choices import SEQUENTIAL_METHODS
from .compensation import reconstruction_map
from .errors import NumericalError, RecipeError
from .memory import release_memory
from .recipe import SelectionSpec, default_fn_boost
from .selection import LayerEvidence, allocate_widths, layer_width, score_layer, top_neurons
from .surgery import supports_bias_compensation

__all__ = ["resolve_selection", "select_neurons", "reconstruction_fills", "rechoose_layer"]

log = logging.getLogger("fnprune")


def resolve_selection(sel: SelectionSpec, layout: MLPLayout, model: torch.nn.Module,
                      kind: str = "classification", in_memory: bool = True) -> SelectionSpec:
    """The selection with its automatic values filled in (method auto for a task of `kind`; fn-task's fn_boost; the
    refit on for classification where the family allows it and surgery runs `in_memory`; bias compensation on where
    the architecture can hold the bias), as the saved recipe records them; RecipeError when bias compensation or the
    refit is asked of a family that cannot take it."""
    sel = sel.for_task(kind)
    if sel.fn_boost is None and sel.method == "fn-task":  # the one criterion that reads it
        sel = dataclasses.replace(sel, fn_boost=default_fn_boost(sel.keep, sel.reconstruct))
    if sel.refit is None:
        sel = dataclasses.replace(
            sel, refit=kind == "classification" and in_memory and adds_to_residual(layout, model))
    if sel.refit and not adds_to_residual(layout, model):
        raise RecipeError(
            f"selection.refit: {model.config.model_type} normalises its MLP output before the residual stream, "
            "so the refit cannot target the block output; set it to false"
        )
    if sel.sequential and sel.method not in SEQUENTIAL_METHODS:
        raise RecipeError(f"selection.sequential: scores {' or '.join(SEQUENTIAL_METHODS)} on the pruned model's "
                          f"activations, not {sel.method}")
    if sel.sequential and sel.answer_weight:
        raise RecipeError("selection.sequential: its reconstruction has no answer_weight; set it to 0")
    if sel.bias_compensation is None:
        return dataclasses.replace(sel, bias_compensation=supports_bias_compensation(layout, model))
    if sel.bias_compensation and not supports_bias_compensation(layout, model):
        raise RecipeError(
            f"selection.bias_compensation: {model.config.model_type} MLPs have no bias to fold the removed "
            "neurons' mean into; set it to false"
        )
    return sel


def select_neurons(
    model: torch.nn.Module,
    calib: Calibration,
    method: str,
    keep: float,
    round_to: int,
    seed: int,
    boost: float | None,
    allocation: str = "uniform",
    reconstruct: bool = True,
    norms: list[dict[str, torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """Kept neuron indices per layer for one criterion and budget (same width everywhere, or one ranking across
    layers with `allocation` "global", "median" or "standardized"). `norms`: `neuron_weight_norms` of `model`, when
    the caller has them already (a pass over every MLP weight)."""
    if norms is None:
        norms = neuron_weight_norms(model, layout_for(model))
    boost = default_fn_boost(keep, reconstruct) if boost is None else boost
    scores = []
    for i, (a, nrm) in enumerate(zip(calib.activations, norms)):
        ev = LayerEvidence(
            layer=i, mean_abs=a.mean_abs, var=a.var, out_norm=nrm["out"], in_norm=nrm["in"], mean=a.mean,
            out_abs_mean=nrm["out_abs_mean"],
            networks=calib.networks[i] if calib.networks else None,
            relevance=calib.relevance[i] if calib.relevance else None,
        )
        scores.append(score_layer(method, ev, seed, boost))
    if allocation != "uniform":
        widths = allocate_widths(scores, keep, round_to, allocation)
    else:
        widths = [layer_width(s.numel(), keep, round_to) for s in scores]
    unrounded = [f"{i}: {w} of {s.numel()}" for i, (s, w) in enumerate(zip(scores, widths))
                 if round_to >= s.numel() > w]
    if unrounded:
        log.warning("round_to %d is not below the MLP width, so it cannot round: %d layers keep a plain share (layer: "
                    "kept of width; %s)", round_to, len(unrounded), ", ".join(unrounded))
    floor = [f"{i}: {w} of {s.numel()}" for i, (s, w) in enumerate(zip(scores, widths)) if w <= round_to < s.numel()]
    if floor:
        log.warning("keep %g: %d of %d layers keep only the round_to minimum of %d neurons (layer: kept of width; "
                    "%s); a lower round_to keeps fewer", keep, len(floor), len(widths), round_to, ", ".join(floor))
    return [top_neurons(s, w) for s, w in zip(scores, widths)]


def reconstruction_fills(
    calib: Calibration,
    kept: list[torch.Tensor],
    centres: list[torch.Tensor] | None,
    ridge: float,
    progress: bool = False,
    release: bool = False,
    answer_weight: float = 0.0,
) -> list[torch.Tensor]:
    """Per layer, the least-squares map that rebuilds removed neurons from kept ones (fnprune.compensation),
    fitted on the calibration token sample (or its second moments); centred on `centres` (the means) when the
    bias can hold it.

    `release` drops each layer's sample as soon as its map is fitted, for callers that fit once, as compress
    does: a token sample (one tensor per layer, as wide MLPs keep) is freed at once, so the samples and the maps
    are never all in memory together (Llama-7B: 32 samples of 4,096 x 11,008 float32 are 5.8 GB, its maps at
    keep 0.5 3.9 GB); moments share one allocation, freed with the last layer's."""
    fills = []
    for i, (a, k) in enumerate(tqdm(list(zip(calib.activations, kept)), desc="reconstruct", unit="layer",
                                    disable=not progress)):
        sample = a.moments if a.moments is not None else a.tokens
        emphasis = {"emphasis": a.decision, "emphasis_weight": answer_weight} if answer_weight else {}
        fill = reconstruction_map(sample, k, centres[i] if centres is not None else None, ridge, **emphasis)
        if release:
            a.tokens = a.moments = sample = None
        release_memory(collect=False)  # each layer's d x d float64 temporaries, before the next layer's
        if not torch.isfinite(fill).all():
            raise NumericalError(f"layer {i}: the reconstruction of removed neurons is not finite; raise --ridge")
        fills.append(fill)
    return fills


def rechoose_layer(method: str, layer: int, acts: LayerActivations, norms: dict[str, torch.Tensor], kept: int,
                   seed: int, centred: bool, reconstruct: bool, ridge: float
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Sequential selection of one layer: its `kept` top neurons by `method` on its activations in the model pruned
    before it (`acts`, as capture summarises them), with the centre bias compensation folds (their mean, when
    `centred`) and the reconstruction map fitted on their token sample (when `reconstruct`)."""
    ev = LayerEvidence(layer=layer, mean_abs=acts.mean_abs, var=acts.var, out_norm=norms["out"], in_norm=norms["in"],
                       mean=acts.mean, out_abs_mean=norms["out_abs_mean"])
    keep = top_neurons(score_layer(method, ev, seed, 0.0), kept)
    centre = acts.mean if centred else None
    fill = reconstruction_map(acts.tokens, keep, centre, ridge) if reconstruct else None
    if fill is not None and not torch.isfinite(fill).all():
        raise NumericalError(f"layer {layer}: the reconstruction of removed neurons is not finite; raise --ridge")
    return keep, centre, fill
