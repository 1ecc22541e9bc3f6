"""The two ICA engines: a layer's whitening, FastICA runs and their pooled networks (pure math; no models).

torch (the default): whitening by seeded block Krylov (`layer_whitening`) and the torch FastICA; for all
layers at once, `find_networks_batch` runs every layer's FastICA runs through one batched fixed-point loop,
layers shared out to one single-threaded worker per core. reference ("sklearn"): NumPy eigh whitening and
scikit-learn's FastICA, one layer after another. Both start run r from scikit-learn's matrix for seed + r, so
with the same whitening they take the same steps; `runs` > 1 pools the networks of seeds seed, seed + 1, ... on
one whitening (`pool_networks`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ..moments import SecondMoments
from .fastica import fast_ica, ica_par, sklearn_fast_ica, sklearn_init
from .maps import LayerNetworks, networks_from_sources, pool_networks
from .threads import ByteBudget, locked, map_in_threads, one_thread, worker_count
from .whitening import check_sample, estimated_whitening_bytes, layer_whitening, reference_gram_whitening

__all__ = ["REVISION", "find_networks_batch", "find_networks_reference", "find_networks_torch"]

ArrayLike = torch.Tensor | np.ndarray
# Bumped whenever the torch engine's networks change for the same inputs and settings, so caches keyed on it
# (`fnprune.networks.cache_identity`) recompute; the CHANGELOG says what each revision changed.
REVISION = 3


def find_networks_reference(
    tokens: np.ndarray | SecondMoments,
    components: int,
    threshold: float,
    seed: int,
    max_iter: int = 400,
    tol: float = 1e-4,
    runs: int = 1,
) -> LayerNetworks:
    """The reference engine's networks of one layer from its token activations `tokens` (T tokens, d neurons)
    or their moments: NumPy eigh whitening of the neuron Gram and scikit-learn's FastICA, run `runs` times."""
    moments = tokens if isinstance(tokens, SecondMoments) else SecondMoments.of(np.asarray(tokens, np.float64))
    check_sample(moments, components)
    dead = int(moments.constant.sum())
    whitened = reference_gram_whitening(moments.correlation_gram().numpy(), components)  # (d, k)
    found = []
    for run_seed in range(seed, seed + runs):
        sources, converged = sklearn_fast_ica(whitened, run_seed, max_iter, tol)  # (k, d)
        found.append(networks_from_sources(sources, threshold, converged, dead))
    return pool_networks(found)


def find_networks_torch(
    tokens: ArrayLike | SecondMoments,
    components: int,
    threshold: float,
    seed: int,
    max_iter: int = 400,
    tol: float = 1e-4,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    eig_method: str = "krylov",
    restarts: int = 1,
    runs: int = 1,
) -> LayerNetworks:
    """The torch engine on one layer (same inputs, checks and post-processing as `find_networks_reference`).

    `tokens`: one layer's token activations (T, d), or their `SecondMoments`. The whitening is the top-k
    eigenvectors of the neuron correlation Gram (`eig_method` "krylov", "randomized" or exact "eigh"), the
    reference's subspace; FastICA run r starts from scikit-learn's matrix for seed + r. Maps come back as float64
    numpy. `restarts` only measures stability (`fast_ica`).
    """
    whitened, dead = layer_whitening(tokens, components, seed, eig_method, device, dtype)
    found = []
    for run in range(runs):
        ica = fast_ica(whitened, "logcosh", max_iter, tol, seed + run, restarts)
        found.append(networks_from_sources(ica.sources.T.cpu().numpy(), threshold, ica.converged, dead))
    return pool_networks(found)


def find_networks_batch(
    layers: Iterable[ArrayLike | SecondMoments],
    components: int,
    threshold: float,
    seed: int,
    max_iter: int = 400,
    tol: float = 1e-4,
    runs: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    eig_method: str = "krylov",
    progress=None,
    max_batch_elements: int = 2**23,
    workers: int | None = None,
    whitening_bytes: int = 2**31,
) -> list[LayerNetworks]:
    """`find_networks_torch` for many layers at once: every layer's FastICA runs go through the fixed-point
    loop as one batch (layers of equal width together, at most `max_batch_elements` values of the runs'
    projections in all workers' batches together), which on the CPU is several times faster than layer after
    layer. Same networks as the per-layer call.

    On the CPU the layers are shared among `workers` threads (default: torch's thread count), each running its
    layers on one torch thread: the loop's many small LAPACK calls (a k x k eigh per run and iteration) do not
    parallelise inside one call. A layer's result does not depend on the worker count as long as its batch holds
    more than one layer (checked in the tests); alone in a batch it can differ by rounding, which FastICA runs that
    stop at `max_iter` amplify. Whitening needs d x d matrices: workers whiten side by side only while their estimates
    (`estimated_whitening_bytes`) sum to at most `whitening_bytes`, so wide MLPs on many cores whiten one layer
    at a time.

    `layers` may be a generator: each layer's tokens or moments are only needed for its whitening, so at most
    one per worker is alive at a time. `progress`: optional tqdm-like bar, advanced once per batched iteration.
    Raises ValueError naming the layer whose activations cannot be unmixed.
    """
    workers = worker_count(device, workers)
    budget = ByteBudget(whitening_bytes)

    def whiten_layer(i: int, layer: ArrayLike | SecondMoments) -> tuple[torch.Tensor, int]:
        try:
            with budget.hold(estimated_whitening_bytes(layer)):
                return layer_whitening(layer, components, seed, eig_method, device, dtype)
        except ValueError as exc:
            raise ValueError(f"layer {i}: {exc}") from exc

    starts = torch.stack([sklearn_init(seed + r, components)[0] for r in range(runs)]).to(device, dtype)
    tick = locked(progress.update) if progress is not None else None

    def unmix(chunk: list[int]) -> list[LayerNetworks]:
        """FastICA for one batch of equal-width layers, then each layer's pooled networks."""
        x = torch.stack([whitened[i][0].T for i in chunk])  # (L, k, d)
        w0 = starts.expand(len(chunk), -1, -1, -1)  # (L, runs, k, k)
        w, n_iter, converged = ica_par(x, w0, "logcosh", max_iter, tol, on_iter=tick)
        if tick is not None:
            tick(max_iter - int(n_iter.max()))
        s = (w.flatten(1, 2) @ x).unflatten(1, (runs, components)).cpu().numpy()  # (L, runs, k, d)
        return [
            pool_networks([networks_from_sources(s[j, r], threshold, bool(converged[j, r]), whitened[i][1])
                           for r in range(runs)])
            for j, i in enumerate(chunk)
        ]

    with one_thread(device):  # every kernel on one thread: results independent of `workers`
        whitened = map_in_threads(whiten_layer, layers, workers)
        chunks = _batches([w.shape[0] for w, _ in whitened], workers, runs * components, max_batch_elements)
        if progress is not None:
            progress.reset(total=len(chunks) * max_iter)
        found = map_in_threads(lambda _, chunk: unmix(chunk), chunks, workers)
    by_layer = {i: nets for chunk, nets_of in zip(chunks, found) for i, nets in zip(chunk, nets_of)}
    return [by_layer[i] for i in range(len(whitened))]


def _batches(widths: list[int], workers: int, rows: int, max_elements: int) -> list[list[int]]:
    """Layer indices grouped into FastICA batches: equal widths together, each worker taking every
    `workers`-th layer of a width, so the slow layers (FastICA runs to max_iter in some layers and converges
    in tens of iterations in others) spread out; at most `max_elements` values of `rows` x width projections
    in all workers' batches together."""
    chunks: list[list[int]] = []
    for width in sorted(set(widths)):
        same = [i for i, w in enumerate(widths) if w == width]
        per_chunk = max(1, max_elements // (workers * rows * width))  # all workers
        for part in (same[j::workers] for j in range(workers)):
            chunks += [part[j : j + per_chunk] for j in range(0, len(part), per_chunk)]
    return chunks
