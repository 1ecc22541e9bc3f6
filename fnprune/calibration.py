"""Stage 1, calibrate: run the calibration prompts through the model, record each layer's MLP activations
(statistics, decision tokens, a token sample or its moments) and find each layer's functional networks."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import cache
from .arch import layout_for
from .capture import LayerActivations, capture_activations
from .data import Example, prompts_digest
from .errors import NumericalError
from .interrupt import deferred_interrupt
from .memory import objects_frozen, release_memory
from .moments import SecondMoments
from .networks import LayerNetworks, cache_identity, find_all_networks, network_relevance
from .provenance import key_versions
from .recipe import Recipe
from .tokens import encode_inputs

__all__ = ["Calibration", "calibrate", "calibration_cache_key", "template_groups"]

log = logging.getLogger("fnprune")


@dataclass
class Calibration:
    """Everything selection needs, computed once per (model, data, settings); reusable across budgets."""

    activations: list[LayerActivations]
    labels: np.ndarray  # (N,) label index of each calibration prompt
    networks: list[LayerNetworks] | None = None
    relevance: list[np.ndarray] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def release_token_sample(self) -> None:
        """Drop the per-layer token samples or their moments (the bulk of calibration memory) once ICA and the
        reconstruction have used them; statistics, decision tokens and networks stay."""
        for a in self.activations:
            a.tokens = a.moments = None


def calibration_cache_key(recipe: Recipe, examples: list[Example], with_sample: bool = True) -> str:
    """Everything the captured activations depend on (model files, prompts, settings, versions)."""
    prompts = prompts_digest(examples)
    return cache.cache_key({
        **({} if with_sample else {"token_sample": False}),  # activations without a sample are a different entry
        "model": cache.model_fingerprint(recipe.model.name_or_path, recipe.model.revision),
        "dtype": recipe.model.dtype,
        "prompts": prompts,
        # `choices` shapes the prompts (hashed above); `cache` only says whether to look here
        "calibration": {k: v for k, v in dataclasses.asdict(recipe.calibration).items()
                        if k not in ("choices", "cache")},
        "moments_group_rows": SecondMoments.GROUP_ROWS,  # how the moments' float32 sums were grouped
        "moments_panels": SecondMoments.PANELS,  # and laid out
        "versions": key_versions(),
    })


def calibrate(
    model: torch.nn.Module,
    tokenizer,
    examples: list[Example],
    label_words: dict[str, str],
    recipe: Recipe,
    with_networks: bool = True,
    progress: bool = True,
    use_cache: bool = False,
    with_sample: bool = True,
) -> Calibration:
    """Capture activations on calibration prompts, then find each layer's functional networks.

    With `use_cache`, activations and networks are read from / written to the on-disk cache (fnprune.cache).
    `with_sample=False` (only when neither networks nor the reconstruction are wanted) captures no token sample:
    the per-neuron statistics and decision tokens only, which saves the sample's d x d products.
    """
    if with_networks and not with_sample:
        raise ValueError("the networks need the token sample: with_networks requires with_sample")
    with objects_frozen():  # the garbage collections between stages skip the model's and imports' objects
        return _calibrate(model, tokenizer, examples, label_words, recipe, with_networks, progress, use_cache,
                          with_sample)


def _calibrate(model, tokenizer, examples, label_words, recipe: Recipe, with_networks: bool, progress: bool,
               use_cache: bool, with_sample: bool) -> Calibration:
    cal = recipe.calibration
    timings: dict[str, float] = {}
    use_cache = use_cache and cache.usable()  # an unwritable cache folder: warned, run without it
    key = calibration_cache_key(recipe, examples, with_sample) if use_cache else ""
    start = time.perf_counter()
    cached = cache.load_activations(key) if use_cache else None
    if cached is not None:
        acts, labels = cached
        log.info("activations from cache %s", cache.cache_dir())
    else:
        seqs = encode_inputs(tokenizer, examples, cal.max_length, model)
        acts = capture_activations(
            model, layout_for(model), seqs, max_tokens=cal.max_tokens if with_sample else 0,
            batch_size=cal.batch_size, seed=cal.seed,
            store_dtype=cal.store_dtype, sample_store=cal.sample_store, progress=progress,
            progress_file=cache.capture_progress_path(key) if use_cache else None,
        )
        for i, a in enumerate(acts):
            if not (torch.isfinite(a.mean).all() and torch.isfinite(a.var).all()):
                raise NumericalError(
                    f"layer {i}: NaN or inf MLP activations on the calibration data (broken weights, or a dtype "
                    "that overflows: try --dtype float32)"
                )
        labels_order = list(label_words)
        labels = np.array([labels_order.index(e.label) for e in examples])
        if use_cache:  # capture's progress file is gone: a first Ctrl-C waits for the entry, not to lose both
            with deferred_interrupt("finishing writing the activations to the cache") as pressed:
                cache.save_activations(key, acts, labels)
            if pressed():
                raise KeyboardInterrupt("the activations are in the cache; the same command continues from there")
    release_memory()  # the forward passes' freed temporaries, before ICA allocates its own
    timings["capture"] = round(time.perf_counter() - start, 3)
    calib = Calibration(acts, labels, timings=timings)
    if with_networks:
        start = time.perf_counter()
        net_key = cache.cache_key({"activations": key, "networks": cache_identity(recipe.networks)})
        calib.networks = cache.load_networks(net_key) if use_cache else None
        if calib.networks is None:
            calib.networks = find_all_networks(acts, recipe.networks, progress)
            release_memory()
            if use_cache:
                cache.save_networks(net_key, calib.networks)
        calib.relevance = _relevance(calib.networks, acts, labels, examples, recipe)
        timings["networks"] = round(time.perf_counter() - start, 3)
    return calib


def _relevance(networks: list[LayerNetworks], acts: list[LayerActivations], labels: np.ndarray,
               examples: list[Example], recipe: Recipe) -> list[np.ndarray]:
    """Each layer's network weights for selection (`networks.relevance`; auto decided by the prompts' kind)."""
    kind = "multiple_choice" if any(e.choices for e in examples) else "classification"
    if recipe.networks.for_task(kind).relevance == "uniform":
        return [np.ones(n.maps.shape[0]) for n in networks]
    groups = template_groups(examples) if recipe.networks.relevance_within_template else None
    return [network_relevance(n.maps, a.decision.numpy(), labels, groups) for n, a in zip(networks, acts)]


def template_groups(examples: list[Example]) -> np.ndarray:
    """(N,) index of each calibration prompt's template, in order of first appearance."""
    names = list(dict.fromkeys(e.template for e in examples))
    return np.array([names.index(e.template) for e in examples])
