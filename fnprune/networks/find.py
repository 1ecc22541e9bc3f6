"""The networks stage: every layer's networks with the recipe's engine, and what cached networks depend on."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ..errors import NumericalError, RecipeError
from ..moments import SecondMoments
from ..recipe import NetworksSpec
from .engines import REVISION, find_networks_batch, find_networks_reference
from .maps import LayerNetworks

__all__ = ["LayerSample", "cache_identity", "find_all_networks", "find_networks"]

log = logging.getLogger("fnprune")


class LayerSample(Protocol):
    """One layer's calibration token sample as capture keeps it (`fnprune.capture.LayerActivations`)."""

    tokens: torch.Tensor | None  # (T, d), or None when only the moments were kept
    moments: SecondMoments | None
    mean: torch.Tensor  # (d,)

    @property
    def sampled(self) -> int: ...

    def sample_moments(self) -> SecondMoments: ...


def find_networks(sample: torch.Tensor | np.ndarray | SecondMoments, spec: NetworksSpec) -> LayerNetworks:
    """One layer's networks from its token sample (T, d) or the sample's moments, with `spec.engine`, pooled
    over `spec.runs` FastICA seeds on one whitening. The torch engine runs the layer as `find_all_networks`
    runs every layer (float32, block Krylov), in a batch of its own."""
    if spec.engine == "torch":
        return find_networks_batch([sample], spec.components, spec.threshold, spec.seed, spec.max_iter, spec.tol,
                                   spec.runs)[0]
    if spec.engine == "sklearn":
        with threadpool_limits(1):  # threaded LAPACK on these small matrices is much slower on shared CPUs
            return find_networks_reference(sample, spec.components, spec.threshold, spec.seed, spec.max_iter,
                                           spec.tol, runs=spec.runs)
    raise ValueError(f"unknown ICA engine {spec.engine!r}; use 'torch' or 'sklearn'")


def find_all_networks(layers: Sequence[LayerSample], spec: NetworksSpec, progress: bool = False) -> list[LayerNetworks]:
    """Every layer's networks: the torch engine runs all layers' FastICA runs in one batched loop from the
    stored sample (moments or tokens), the reference engine layer by layer from the sample's moments.

    Raises RecipeError when `spec.components` does not fit the sample and NumericalError naming a layer whose
    activations cannot be unmixed; logs dead neurons and layers where FastICA stopped at `max_iter`.
    """
    n_tokens, width = layers[0].sampled, int(layers[0].mean.numel())
    if spec.components >= min(n_tokens, width):
        raise RecipeError(
            f"networks.components ({spec.components}) must be below the calibration tokens captured "
            f"({n_tokens}) and the MLP width ({width})"
        )
    try:
        if spec.engine == "torch":
            with tqdm(desc="ICA", unit="it", disable=not progress) as bar:
                found = find_networks_batch(
                    (a.moments if a.moments is not None else a.tokens for a in layers), spec.components,
                    spec.threshold, spec.seed, spec.max_iter, spec.tol, spec.runs, progress=bar,
                )
        else:
            found = []
            for i, a in enumerate(tqdm(layers, desc="ICA", unit="layer", disable=not progress)):
                try:
                    found.append(find_networks(a.sample_moments(), spec))
                except ValueError as exc:
                    raise ValueError(f"layer {i}: {exc}") from exc
    except ValueError as exc:
        raise NumericalError(str(exc)) from exc
    dead = {i: n.dead_neurons for i, n in enumerate(found) if n.dead_neurons}
    if dead:
        log.warning("neurons that never vary on the calibration data (layer: count): %s", dead)
    slow = [i for i, n in enumerate(found) if not n.converged]
    if slow:
        log.warning(
            "FastICA stopped at max_iter=%d before tol=%g in %d of %d layers (%s); the maps are still used",
            spec.max_iter, spec.tol, len(slow), len(layers), ", ".join(map(str, slow)),
        )
    return found


def cache_identity(spec: NetworksSpec) -> dict[str, Any]:
    """What a layer's networks depend on besides its activations, for cache keys: the spec, and for the torch
    engine its `REVISION`, so networks cached by an earlier torch engine are recomputed."""
    identity = dataclasses.asdict(spec)
    for after in ("relevance", "relevance_within_template"):  # how the networks are weighted afterwards,
        del identity[after]  # not what ICA finds
    if spec.engine == "torch":
        identity["revision"] = REVISION
    return identity
