"""compress(recipe): data -> capture -> networks -> selection -> surgery -> evaluate -> save.

One linear function that reads like a table of contents; each stage lives in its own module.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.metadata
import json
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
import transformers
from tqdm.auto import tqdm

from . import __version__, cache
from .arch import MLPLayout, is_classifier, layout_for, mlp_widths, neuron_weight_norms
from .capture import LayerActivations, capture_activations, capture_memory_bytes
from .checkpoint import (
    CARD_FILE,
    RECIPE_FILE,
    REPORT_FILE,
    CardInfo,
    atomic_output_dir,
    check_disk_space,
    check_output_dir,
    model_card,
    save_networks,
    write_json,
    write_per_layer_code,
)
from .compensation import reconstruction_map
from .data import (
    BUILTIN_TASKS,
    Example,
    check_disjoint,
    data_source,
    file_sha256,
    label_keys,
    load_evaluation,
    load_sample,
    resolve_task,
)
from .errors import NumericalError, RecipeError
from .evaluate import TaskResult, evaluate_templates
from .hub import push_folder
from .memory import objects_frozen, release_memory
from .models import checkpoint_bytes, count_parameters, load_model, local_model_dir, unique_parameters
from .moments import SecondMoments
from .networks import LayerNetworks, cache_identity, find_all_networks, network_relevance
from .perplexity import perplexity, wikitext_file, wikitext_ids
from .recipe import (
    PERPLEXITY_TASK,
    ModelSpec,
    Recipe,
    TaskSpec,
    ValidationTask,
    default_fn_boost,
    dump_recipe,
)
from .recovery import RecoveryResult, TeacherTargets, recover, teacher_targets
from .selection import NEEDS_NETWORKS, LayerEvidence, allocate_widths, layer_width, score_layer, top_neurons
from .stream_surgery import source_weight_map, stream_prune
from .surgery import prune_mlp, supports_bias_compensation
from .tokens import encode_inputs

__all__ = ["compress", "CompressResult", "Calibration", "calibrate", "select_neurons"]

log = logging.getLogger("fnprune")


@dataclass
class CompressResult:
    output_dir: Path
    report: dict[str, Any]
    recipe: Recipe


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


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("%s ...", name)
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        log.info("%s done in %.1f s", name, self.seconds[name])


def versions() -> dict[str, str]:
    return {
        "fnprune": __version__,
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "safetensors": str(safetensors.__version__),
        "scikit-learn": importlib.metadata.version("scikit-learn"),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
    }


def calibration_cache_key(recipe: Recipe, examples: list[Example], with_sample: bool = True) -> str:
    """Everything the captured activations depend on (model files, prompts, settings, versions)."""
    prompts = hashlib.sha256("\x00".join(f"{e.label}\x01{e.prompt}" for e in examples).encode()).hexdigest()
    return cache.cache_key({
        **({} if with_sample else {"token_sample": False}),  # activations without a sample are a different entry
        "model": cache.model_fingerprint(recipe.model.name_or_path, recipe.model.revision),
        "dtype": recipe.model.dtype,
        "prompts": prompts,
        "calibration": dataclasses.asdict(recipe.calibration),
        "moments_group_rows": SecondMoments.GROUP_ROWS,  # how the moments' float32 sums were grouped
        "versions": {k: v for k, v in versions().items() if k in ("torch", "transformers", "fnprune")},
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
        seqs = encode_inputs(tokenizer, examples, cal.max_length, is_classifier(model))
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
        if use_cache:
            cache.save_activations(key, acts, labels)
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
        groups = template_groups(examples) if recipe.networks.relevance_within_template else None
        calib.relevance = [
            network_relevance(n.maps, a.decision.numpy(), labels, groups) for n, a in zip(calib.networks, acts)
        ]
        timings["networks"] = round(time.perf_counter() - start, 3)
    return calib


def template_groups(examples: list[Example]) -> np.ndarray:
    """(N,) index of each calibration prompt's template, in order of first appearance."""
    names = list(dict.fromkeys(e.template for e in examples))
    return np.array([names.index(e.template) for e in examples])


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
) -> list[torch.Tensor]:
    """Kept neuron indices per layer for one criterion and budget (same width everywhere, or one global
    ranking across layers with `allocation="global"`)."""
    layout = layout_for(model)
    norms = neuron_weight_norms(model, layout)
    boost = default_fn_boost(keep, reconstruct) if boost is None else boost
    scores = []
    for i, (a, nrm) in enumerate(zip(calib.activations, norms)):
        ev = LayerEvidence(
            layer=i, mean_abs=a.mean_abs, var=a.var, out_norm=nrm["out"], in_norm=nrm["in"],
            networks=calib.networks[i] if calib.networks else None,
            relevance=calib.relevance[i] if calib.relevance else None,
        )
        scores.append(score_layer(method, ev, seed, boost))
    if allocation == "global":
        widths = allocate_widths(scores, keep, round_to)
    else:
        widths = [layer_width(s.numel(), keep, round_to) for s in scores]
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


def _data_provenance(task, splits: list[str]) -> dict[str, Any]:
    out = {}
    for split in splits:
        path = data_source(task, split)
        out[split] = (
            {"file": str(path), "sha256": file_sha256(path)}
            if path
            else {"dataset": task.dataset, "config": task.dataset_config}
        )
    return out


def _absolute_model(spec: ModelSpec) -> ModelSpec:
    """Local model paths made absolute, so a saved recipe reruns from any directory."""
    if spec.offload_folder:
        spec = dataclasses.replace(spec, offload_folder=str(Path(spec.offload_folder).expanduser().resolve()))
    path = Path(spec.name_or_path).expanduser()
    return dataclasses.replace(spec, name_or_path=str(path.resolve())) if path.exists() else spec


def _absolute_data(task: TaskSpec) -> TaskSpec:
    return dataclasses.replace(
        task,
        data_dir=str(Path(task.data_dir).expanduser().resolve()) if task.data_dir else None,
        data_files={k: str(Path(v).expanduser().resolve()) for k, v in task.data_files.items()},
    )


def _evaluate(model, tokenizer, sets, task, recipe: Recipe, progress: bool, cached_as: ModelSpec | None = None,
              ) -> TaskResult | None:
    """Accuracy under every template; with `cached_as` (the dense model's spec) read from / saved to the cache,
    so the next compress of the same base model does not score it again."""
    if not recipe.evaluation.enabled:
        return None
    key = ""
    if cached_as is not None and recipe.calibration.cache:
        key = evaluation_cache_key(cached_as, sets, task, recipe.evaluation.batch_size)
        found = cache.load_evaluation(key, sets, task)
        if found is not None:
            log.info("dense evaluation from cache %s", cache.cache_dir())
            return found
    result = evaluate_templates(model, tokenizer, sets, task, recipe.evaluation.batch_size, progress=progress)
    if key:
        cache.save_evaluation(key, result)
    return result


def evaluation_cache_key(spec: ModelSpec, sets: dict[str, list[Example]], task: TaskSpec, batch_size: int) -> str:
    """Everything a model's scores depend on: model files, prompts, label words, batching, versions."""
    digest = hashlib.sha256()
    for name, examples in sets.items():
        words = next(t for t in task.templates if t.name == name).words(task.label_words)
        digest.update(json.dumps([name, words]).encode())
        digest.update("\x00".join(f"{e.label}\x01{e.prompt}" for e in examples).encode())
        if task.kind != "classification":  # classification keys stay as they were
            digest.update(json.dumps([task.kind, [[e.delimiter, *e.choices] for e in examples]]).encode())
    return cache.cache_key({
        "evaluation": digest.hexdigest(),
        "model": cache.model_fingerprint(spec.name_or_path, spec.revision),
        "dtype": spec.dtype,
        "batch_size": batch_size,
        "versions": {k: v for k, v in versions().items() if k in ("torch", "transformers", "fnprune")},
    })


@dataclass
class Validation:
    """A run's extra benchmarks, loaded once: each task's examples under its templates, the perplexity tokens."""

    tasks: list[tuple[ValidationTask, TaskSpec, dict[str, list[Example]]]] = field(default_factory=list)
    perplexity: tuple[ValidationTask, Path, torch.Tensor] | None = None
    window: int = 512


def load_validation(recipe: Recipe, tokenizer) -> Validation:
    """The recipe's `evaluation.validation`: built-in tasks on their evaluation split (held-out templates unless
    named), WikiText-2 as the first `evaluation.perplexity_tokens` tokens of the file. Problems: Data/RecipeError."""
    ev = recipe.evaluation
    out = Validation(window=ev.perplexity_window)
    if not ev.enabled:
        return out
    for v in ev.validation:
        if v.task == PERPLEXITY_TASK:
            path = wikitext_file(v.file or v.data_dir or "")
            out.perplexity = (v, path, wikitext_ids(tokenizer, path, ev.perplexity_tokens))
            continue
        if v.task not in BUILTIN_TASKS:
            raise RecipeError(f"evaluation.validation: {v.task!r} is not a built-in task ({', '.join(BUILTIN_TASKS)}) "
                              f"or {PERPLEXITY_TASK}")
        task = resolve_task(TaskSpec(name=v.task, data_dir=v.data_dir))
        sets = load_evaluation(task, task.evaluation_split, v.max_samples or ev.max_samples)
        wanted = v.templates or [t.name for t in task.held_out_templates()] or list(sets)
        unknown = [n for n in wanted if n not in sets]
        if unknown:
            raise RecipeError(f"evaluation.validation {v.task}: no template(s) {unknown} (its templates: "
                              f"{', '.join(sets)})")
        out.tasks.append((v, task, {n: sets[n] for n in wanted}))
    return out


def _validate(model, tokenizer, validation: Validation, recipe: Recipe, progress: bool,
              cached_as: ModelSpec | None = None) -> dict[str, Any]:
    """Every validation benchmark's result (TaskResult, or PerplexityResult for wikitext); the dense model's
    read from / saved to the cache like its task scores."""
    out: dict[str, Any] = {}
    for v, task, sets in validation.tasks:
        out[v.task] = _evaluate(model, tokenizer, sets, task, recipe, progress, cached_as)
    if validation.perplexity is not None and recipe.evaluation.enabled:
        v, path, ids = validation.perplexity
        window, key = validation.window, ""
        if cached_as is not None and recipe.calibration.cache:
            key = cache.cache_key({
                "perplexity": file_sha256(path), "tokens": ids.numel(), "window": window,
                "model": cache.model_fingerprint(cached_as.name_or_path, cached_as.revision), "dtype": cached_as.dtype,
                "versions": {k: x for k, x in versions().items() if k in ("torch", "transformers", "fnprune")},
            })
        found = cache.load_perplexity(key) if key else None
        if found is not None:
            log.info("dense perplexity from cache %s", cache.cache_dir())
        else:
            if progress:
                tqdm.write(f"evaluate: {PERPLEXITY_TASK} perplexity over {ids.numel()} tokens")
            found = perplexity(model, ids, window)
            if key:
                cache.save_perplexity(key, found)
        out[v.task] = found
    return out


def validation_report(validation: Validation, dense: dict[str, Any], pruned: dict[str, Any]) -> dict[str, Any]:
    """report.json's `validation`: each task's accuracy_report, and the perplexity, dense beside pruned."""
    if not (validation.tasks or validation.perplexity):
        return {}
    out: dict[str, Any] = {"tasks": [
        {"task": v.task, "data_dir": v.data_dir, **accuracy_report(task, dense.get(v.task), pruned.get(v.task))}
        for v, task, _ in validation.tasks
    ]}
    if validation.perplexity is not None:
        v, path, ids = validation.perplexity
        d, p = dense.get(v.task), pruned.get(v.task)
        out["perplexity"] = {
            "task": v.task, "file": str(path), "tokens": int(ids.numel()),
            "tokens_scored": d.tokens_scored if d else None, "window": validation.window,
            "dense": d.ppl if d else None, "pruned": p.ppl if p else None,
        }
    return out


def accuracy_report(task: TaskSpec, dense: TaskResult | None, pruned: TaskResult | None) -> dict[str, Any]:
    """report.json's accuracy: the headline (held-out template mean), each template, and both means."""
    held = dense.held_out if dense else [t.name for t in task.held_out_templates()]
    acc = lambda r, name: r.by_template[name].accuracy if r else None  # noqa: E731
    shares = lambda r, name: r.by_template[name].label_shares() if r else None  # noqa: E731
    norm = lambda r, name: r.by_template[name].accuracy_norm if r else None  # noqa: E731
    mean = lambda r, h, n=False: r.mean(h, n) if r else None  # noqa: E731
    names = list(dense.by_template) if dense else [t.name for t in task.templates]
    texts = {t.name: t.template for t in task.templates}
    return {
        "metric": {
            "name": "accuracy",
            "split": task.evaluation_split,
            "n": dense.n if dense else None,
            "of": "held-out templates (mean)" if held else "calibration templates (mean)",
            "dense": dense.headline if dense else None,
            "pruned": pruned.headline if pruned else None,
            "majority_class": dense.majority if dense else None,
            "kind": task.kind,
            "dense_acc_norm": mean(dense, bool(held), True),  # lm-eval's acc_norm, same templates
            "pruned_acc_norm": mean(pruned, bool(held), True),
        },
        "template_means": {
            kind: {"dense": mean(dense, h), "pruned": mean(pruned, h),
                   "dense_acc_norm": mean(dense, h, True), "pruned_acc_norm": mean(pruned, h, True)}
            for kind, h in (("calibration", False), ("held_out", True))
        },
        "templates": [
            {"name": n, "held_out": n in held, "template": texts[n], "dense": acc(dense, n), "pruned": acc(pruned, n),
             "dense_acc_norm": norm(dense, n), "pruned_acc_norm": norm(pruned, n),
             "predicted": {"dense": shares(dense, n), "pruned": shares(pruned, n)}}
            for n in names
        ],
    }


def _networks_artifact(calib: Calibration, kept: list[torch.Tensor]) -> tuple[dict, dict]:
    tensors: dict[str, torch.Tensor] = {f"layers.{i}.kept": k.to(torch.int64) for i, k in enumerate(kept)}
    meta: dict[str, Any] = {"layers": []}
    for i, n in enumerate(calib.networks or []):
        tensors[f"layers.{i}.maps"] = torch.from_numpy(n.maps.astype(np.float32))
        meta["layers"].append(
            {
                "layer": i,
                "threshold": n.threshold,
                "converged": n.converged,
                "dead_neurons": n.dead_neurons,
                "network_sizes": n.members.sum(axis=1).tolist(),
                "relevance": [round(float(r), 6) for r in calib.relevance[i]] if calib.relevance else None,
            }
        )
    return tensors, meta


def compress(recipe: Recipe, progress: bool = True) -> CompressResult:
    """Run one compression; returns where the checkpoint went and its report."""
    recipe.validate()
    out_dir = Path(recipe.output.dir).expanduser()
    inputs = [recipe.model.name_or_path, recipe.task.data_dir, *recipe.task.data_files.values()]
    check_output_dir(out_dir, recipe.output.overwrite, inputs)  # before loading: never replaces an input
    timer = _Timer()
    sel = recipe.selection

    with timer.stage("load"):
        task = resolve_task(recipe.task)
        calibration = load_sample(task, task.calibration_split, recipe.calibration.num_samples,
                                  recipe.calibration.seed, recipe.calibration.raw_share)
        evaluation = load_evaluation(task, task.evaluation_split)
        check_disjoint(calibration, next(iter(evaluation.values())))
        if recipe.evaluation.max_samples:
            evaluation = {name: ex[: recipe.evaluation.max_samples] for name, ex in evaluation.items()}
        model, tokenizer = load_model(recipe.model)
        validation = load_validation(recipe, tokenizer)
        layout: MLPLayout = layout_for(model)
        source = local_model_dir(recipe.model.name_or_path, recipe.model.revision) if recipe.streamed() else None
        if source is not None:
            source_weight_map(source)  # fail now, not after calibration, if the files cannot be streamed
        if sel.fn_boost is None:
            sel = dataclasses.replace(sel, fn_boost=default_fn_boost(sel.keep, sel.reconstruct))
        if sel.bias_compensation is None:  # auto: on where the architecture can hold the bias
            sel = dataclasses.replace(sel, bias_compensation=supports_bias_compensation(layout, model))
        elif sel.bias_compensation and not supports_bias_compensation(layout, model):
            raise RecipeError(
                f"selection.bias_compensation: {model.config.model_type} MLPs have no bias to fold the removed "
                "neurons' mean into; set it to false"
            )
    widths = mlp_widths(model, layout)
    n_layers = len(widths)
    if sel.method in NEEDS_NETWORKS and recipe.networks.components >= min(min(widths), recipe.calibration.max_tokens):
        raise RecipeError(
            f"networks.components ({recipe.networks.components}) must be below the MLP width ({min(widths)}) and "
            f"calibration.max_tokens ({recipe.calibration.max_tokens})"
        )
    param_bytes = sum(p.numel() * p.element_size() for p in unique_parameters(model))
    check_disk_space(out_dir, param_bytes + param_bytes // 10)  # the dense size bounds the pruned checkpoint
    with_sample = sel.method in NEEDS_NETWORKS or sel.reconstruct  # else no token sample is captured
    sample_tokens = recipe.calibration.max_tokens if with_sample else 0
    log.info(
        "capture holds at most %.1f MiB of activations (%d layers x %d neurons x %d sampled tokens)",
        capture_memory_bytes(
            n_layers, max(widths), sample_tokens, len(calibration), recipe.calibration.store_dtype,
            recipe.calibration.sample_store,
        ) / 2**20,
        n_layers, max(widths), sample_tokens,
    )
    # From here to surgery the model, tokenizer and imports stay alive: garbage collections skip them
    # (several collections over ~400k objects cost about 0.6 s).
    with objects_frozen():
        calib = calibrate(
            model, tokenizer, calibration, dict.fromkeys(label_keys(task, calibration), ""), recipe,
            sel.method in NEEDS_NETWORKS, progress,
            use_cache=recipe.calibration.cache, with_sample=with_sample,
        )
        timer.seconds.update(calib.timings)
        with timer.stage("selection"):
            kept = select_neurons(
                model, calib, sel.method, sel.keep, sel.round_to, sel.seed, sel.fn_boost, sel.allocation
            )
        with timer.stage("evaluate_dense"):
            dense_params = count_parameters(model)
            dense_eval = _evaluate(model, tokenizer, evaluation, task, recipe, progress, cached_as=recipe.model)
            dense_val = _validate(model, tokenizer, validation, recipe, progress, cached_as=recipe.model)
        teacher = None
        if recipe.recovery.enabled:
            with timer.stage("teacher"):
                teacher = _teacher(model, tokenizer, calibration, recipe, progress)
        removed_means = [a.mean for a in calib.activations] if sel.bias_compensation else None
        fill_maps = None
        tokens_for_ica = calib.activations[0].sampled
        if sel.reconstruct:
            with timer.stage("reconstruct"):
                fill_maps = reconstruction_fills(calib, kept, removed_means, sel.ridge, progress, release=True,
                                                 answer_weight=sel.answer_weight)
        calib.release_token_sample()  # before surgery and saving, which need memory of their own
        release_memory()
    with atomic_output_dir(out_dir, recipe.output.overwrite) as tmp:
        if source is not None:  # streamed: the pruned weights go straight from the source files to `tmp`
            with timer.stage("surgery"):
                pruned_params = _stream_save(
                    model, tokenizer, source, tmp, layout, kept, removed_means, fill_maps, recipe
                )
            model = None  # free the dense model (its devices, its offload hooks) before loading the pruned one
            gc.collect()
            with timer.stage("evaluate_pruned"):
                pruned_eval, pruned_val = _evaluate_saved(tmp, tokenizer, evaluation, task, validation, recipe,
                                                          progress)
        else:
            with timer.stage("surgery"):
                prune_mlp(model, layout, kept, removed_means, recipe.output.layout, fill_maps)
                del fill_maps
                release_memory(collect=False)  # the dense MLP weights just freed, before evaluation and saving
            pruned_eval, pruned_val = None, {}
            if teacher is None or recipe.recovery.evaluate_before:
                with timer.stage("evaluate_pruned"):
                    pruned_eval = _evaluate(model, tokenizer, evaluation, task, recipe, progress)
                    pruned_val = _validate(model, tokenizer, validation, recipe, progress)
            if teacher is not None:
                before = {"eval": pruned_eval, "validation": pruned_val}
                with timer.stage("recover"):
                    recovered = _recover(model, tokenizer, layout, calibration, teacher, recipe, progress)
                with timer.stage("evaluate_recovered"):
                    pruned_eval = _evaluate(model, tokenizer, evaluation, task, recipe, progress)
                    pruned_val = _validate(model, tokenizer, validation, recipe, progress)
            pruned_params = count_parameters(model)
        extra = {}
        if teacher is not None:
            extra["recovery"] = recovery_report(recipe, recovered, task, dense_eval, before, validation, dense_val)
        report, resolved = _finish(
            tmp, model, tokenizer, recipe, sel, task, calib, kept, widths, calibration, tokens_for_ica,
            dense_params, pruned_params, dense_eval, pruned_eval, timer, validation_report(validation, dense_val,
                                                                                         pruned_val), extra,
        )
    if recipe.output.push_to_hub:
        with timer.stage("push"):
            push_folder(out_dir, recipe.output.push_to_hub, recipe.output.private)
    return CompressResult(out_dir, report, resolved)


def teacher_cache_key(recipe: Recipe, seqs: list[list[int]]) -> str:
    """Everything the dense model's distributions on the calibration prompts depend on."""
    return cache.cache_key({
        "teacher": hashlib.sha256(json.dumps(seqs).encode()).hexdigest(),
        "top_k": recipe.recovery.top_k,
        "model": cache.model_fingerprint(recipe.model.name_or_path, recipe.model.revision),
        "dtype": recipe.model.dtype,
        "versions": {k: v for k, v in versions().items() if k in ("torch", "transformers", "fnprune")},
    })


def _recovery_inputs(tokenizer, model, calibration: list[Example], recipe: Recipe) -> list[list[int]]:
    return encode_inputs(tokenizer, calibration, recipe.calibration.max_length, is_classifier(model))


def _teacher(model, tokenizer, calibration: list[Example], recipe: Recipe, progress: bool) -> TeacherTargets:
    """The dense model's distributions on the calibration prompts (recovery's targets), from the cache if there."""
    seqs = _recovery_inputs(tokenizer, model, calibration, recipe)
    use_cache = recipe.calibration.cache and cache.usable()
    key = teacher_cache_key(recipe, seqs) if use_cache else ""
    found = cache.load_teacher(key) if key else None
    if found is not None:
        log.info("teacher distributions from cache %s", cache.cache_dir())
        return found
    targets = teacher_targets(model, seqs, recipe.recovery.top_k, recipe.calibration.batch_size, progress)
    log.info("teacher: %d positions x top %d = %.1f MiB", targets.indices.shape[0], targets.indices.shape[1],
             targets.nbytes / 2**20)
    if key:
        cache.save_teacher(key, targets)
    return targets


def _recover(model, tokenizer, layout: MLPLayout, calibration: list[Example], teacher: TeacherTargets,
             recipe: Recipe, progress: bool) -> RecoveryResult:
    seqs = _recovery_inputs(tokenizer, model, calibration, recipe)
    use_cache = recipe.calibration.cache and cache.usable()
    return recover(model, layout, seqs, teacher, recipe.recovery, progress,
                   progress_dir=cache.cache_dir() if use_cache else None)


def recovery_report(recipe: Recipe, result: RecoveryResult, task: TaskSpec, dense: TaskResult | None,
                    before: dict[str, Any], validation: Validation, dense_val: dict[str, Any]) -> dict[str, Any]:
    """report.json's `recovery`: its settings and cost, and the pruned model's scores before it."""
    acc = accuracy_report(task, dense, before["eval"]) if before["eval"] is not None else None
    return {
        "settings": dataclasses.asdict(recipe.recovery),
        **dataclasses.asdict(result),
        "before": {"metric": acc["metric"], "template_means": acc["template_means"],
                   "templates": {t["name"]: t["pruned"] for t in acc["templates"]}} if acc else None,
        "validation_before": validation_report(validation, dense_val, before["validation"]) or None,
    }


def _stream_save(model, tokenizer, source: Path, tmp: Path, layout: MLPLayout, kept, removed_means, fill_maps,
                 recipe: Recipe) -> int:
    """Prune from the source checkpoint files into `tmp` (never a second copy of the weights); write config,
    generation config and tokenizer as save_pretrained would. Returns the pruned parameter count."""
    written = stream_prune(
        source, tmp, model.config, layout, kept, removed_means, recipe.output.layout,
        dtype=getattr(torch, recipe.model.dtype), max_shard_size=recipe.output.max_shard_size, fill_maps=fill_maps,
    )
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return count_parameters(model) + written.parameters_delta


def _evaluate_saved(tmp: Path, tokenizer, evaluation, task, validation: Validation, recipe: Recipe, progress: bool,
                    ) -> tuple[TaskResult | None, dict[str, Any]]:
    """Accuracy (and the validation benchmarks) of the checkpoint written to `tmp`, loaded with the recipe's
    device map."""
    if not recipe.evaluation.enabled:
        return None, {}
    pruned, _ = load_model(dataclasses.replace(recipe.model, name_or_path=str(tmp), revision=None))
    try:
        return (_evaluate(pruned, tokenizer, evaluation, task, recipe, progress),
                _validate(pruned, tokenizer, validation, recipe, progress))
    finally:
        del pruned
        gc.collect()


def _finish(
    tmp: Path, model, tokenizer, recipe: Recipe, sel, task, calib: Calibration, kept, widths, calibration,
    tokens_for_ica: int, dense_params: int, pruned_params: int, dense_eval: TaskResult | None,
    pruned_eval: TaskResult | None, timer: _Timer, validation: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Recipe]:
    """Write the in-memory pruned model (None: streamed, already written) and tokenizer, the recipe, networks,
    report and model card into `tmp`; returns (report, resolved recipe)."""
    output = dataclasses.replace(recipe.output, streamed=recipe.streamed())
    resolved = Recipe(
        model=_absolute_model(recipe.model), task=_absolute_data(task), calibration=recipe.calibration,
        networks=recipe.networks, selection=sel, recovery=recipe.recovery, evaluation=recipe.evaluation,
        output=output,
        provenance={
            "versions": versions(),
            "data": _data_provenance(task, [task.calibration_split, task.evaluation_split]),
        },
    )
    recipe_yaml = dump_recipe(resolved)
    report: dict[str, Any] = {
        "fnprune_version": __version__,
        "base_model": recipe.model.name_or_path,
        "task": task.name,
        "method": sel.method,
        "allocation": sel.allocation,
        "layout": recipe.output.layout,
        "keep": sel.keep,
        "bias_compensation": sel.bias_compensation,
        "reconstruct": sel.reconstruct,
        "ridge": sel.ridge if sel.reconstruct else None,
        "calibration": {
            "split": task.calibration_split,
            "samples": len(calibration),
            "tokens_seen": calib.activations[0].count,
            "tokens_for_ica": tokens_for_ica,
        },
        "parameters": {"dense": dense_params, "pruned": pruned_params},
        "mlp_neurons": {"dense": sum(widths), "pruned": sum(len(k) for k in kept)},
        "widths": {"dense": max(widths), "pruned": [len(k) for k in kept]},
        "file_bytes": {"dense": checkpoint_bytes(recipe.model), "pruned": None},
        **accuracy_report(task, dense_eval, pruned_eval),
        **({"validation": validation} if validation else {}),
        **(extra or {}),
        "timings_seconds": timer.seconds,
    }
    report["parameters"]["ratio"] = round(report["parameters"]["pruned"] / dense_params, 6)

    with timer.stage("save"):
        if model is not None:  # streamed surgery has written the weights already
            if recipe.output.layout == "per-layer":
                write_per_layer_code(tmp, model)
            model.save_pretrained(tmp, max_shard_size=recipe.output.max_shard_size)
            tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
        save_networks(tmp, *_networks_artifact(calib, kept))
        report["file_bytes"]["pruned"] = sum(f.stat().st_size for f in tmp.glob("model*.safetensors"))
        report["timings_seconds"] = timer.seconds
        write_json(tmp / REPORT_FILE, report)
        card = CardInfo(recipe.model.name_or_path, task.name, sel.method, sel.keep, report, recipe_yaml)
        (tmp / CARD_FILE).write_text(model_card(card, __version__), encoding="utf-8")
    report["timings_seconds"] = timer.seconds
    return report, resolved
